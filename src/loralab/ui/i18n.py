"""Japanese and English strings of the web UI, the language choice, and a registry that relabels components."""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

LANGUAGES = ("en", "ja")
DEFAULT_LANGUAGE = "en"

# key: (English, Japanese). Placeholders use str.format names.
STRINGS: dict[str, tuple[str, str]] = {
    # header and tabs
    "app.title": ("loralab: LoRA fine-tuning studio", "loralab: LoRA ファインチューニング スタジオ"),
    "app.subtitle": ("Upload a dataset, train an adapter, watch it learn, then chat with it.",
                     "データセットをアップロードし、アダプターを学習させ、学習の様子を見てから、チャットで試せます。"),
    "app.language": ("Language", "言語"),
    "tab.dashboard": ("Dashboard", "ダッシュボード"),
    "tab.datasets": ("Datasets", "データセット"),
    "tab.train": ("Train", "学習"),
    "tab.monitor": ("Job monitor", "ジョブモニター"),
    "tab.playground": ("Playground", "プレイグラウンド"),
    "tab.models": ("Models", "モデル"),
    "common.refresh": ("Refresh", "更新"),
    "common.none": ("(none)", "（なし）"),
    "common.error": ("Error: {message}", "エラー: {message}"),
    # dashboard
    "dash.system": ("System", "システム"),
    "dash.cpu": ("CPU cores", "CPU コア数"),
    "dash.memory": ("Memory (available / total)", "メモリ（空き / 合計）"),
    "dash.disk": ("Disk (free / total)", "ディスク（空き / 合計）"),
    "dash.gpu": ("GPU", "GPU"),
    "dash.no_gpu": ("none: training runs on the CPU", "なし（CPU で学習します）"),
    "dash.versions": ("Versions", "バージョン"),
    "dash.running": ("Running and queued jobs", "実行中・待機中のジョブ"),
    "dash.recent": ("Recent jobs", "最近のジョブ"),
    "dash.links": ("Quick links", "クイックリンク"),
    "dash.go_datasets": ("Upload a dataset", "データセットをアップロード"),
    "dash.go_train": ("Start training", "学習を開始"),
    "dash.go_playground": ("Open the playground", "プレイグラウンドを開く"),
    "dash.api_docs": ("API reference (/docs)", "API リファレンス（/docs）"),
    "dash.no_jobs": ("No jobs yet.", "ジョブはまだありません。"),
    # job table columns
    "col.id": ("ID", "ID"),
    "col.status": ("Status", "状態"),
    "col.model": ("Model", "モデル"),
    "col.name": ("Name", "名前"),
    "col.base": ("Base model", "ベースモデル"),
    "col.method": ("Method", "手法"),
    "col.progress": ("Progress", "進捗"),
    "col.loss": ("Loss", "損失"),
    "col.created": ("Created", "作成日時"),
    "col.version": ("Version", "バージョン"),
    "col.format": ("Format", "形式"),
    "col.rows": ("Rows", "行数"),
    "col.file": ("File", "ファイル"),
    "col.size": ("Size", "サイズ"),
    "col.line": ("Line", "行"),
    "col.field": ("Field", "フィールド"),
    "col.code": ("Code", "コード"),
    "col.message": ("Message", "メッセージ"),
    "col.row": ("#", "#"),
    "col.system": ("System", "システム"),
    "col.user": ("User / prompt", "ユーザー / プロンプト"),
    "col.assistant": ("Assistant / answer", "アシスタント / 回答"),
    "col.stage": ("Stage", "ステージ"),
    "col.deployed": ("Deployed", "デプロイ中"),
    "col.dataset": ("Dataset", "データセット"),
    "col.job": ("Job", "ジョブ"),
    "col.tokens": ("Tokens", "トークン数"),
    "col.count": ("Rows", "行数"),
    "col.step": ("Step", "ステップ"),
    "col.lr": ("Learning rate", "学習率"),
    "col.run": ("Run", "実行"),
    # statuses
    "status.validating_files": ("validating", "検証中"),
    "status.queued": ("queued", "待機中"),
    "status.running": ("running", "実行中"),
    "status.succeeded": ("succeeded", "成功"),
    "status.failed": ("failed", "失敗"),
    "status.cancelled": ("cancelled", "キャンセル済み"),
    # datasets
    "ds.upload": ("Upload a dataset (drag and drop: JSONL, JSON, CSV or Parquet)",
                  "データセットをアップロード（ドラッグ＆ドロップ: JSONL / JSON / CSV / Parquet）"),
    "ds.name": ("Name (optional)", "名前（省略可）"),
    "ds.name_info": ("Same name = a new version of that dataset. Default: the file name.",
                     "同じ名前でアップロードすると新しいバージョンになります。省略時はファイル名。"),
    "ds.format": ("Format", "形式"),
    "ds.format_info": ("'auto' detects alpaca, chat, ShareGPT, text or preference rows.",
                       "「auto」は alpaca・chat・ShareGPT・テキスト・選好データを自動判別します。"),
    "ds.uploaded": ("Saved **{name}** version {version}: format **{format}** detected, {rows} rows.",
                    "**{name}** のバージョン {version} を保存しました。検出された形式: **{format}**、{rows} 行。"),
    "ds.invalid": ("The file was not saved: {count} problem(s). Fix the lines below and upload again.",
                   "ファイルは保存されませんでした（問題 {count} 件）。下の行を直してから再度アップロードしてください。"),
    "ds.errors": ("Problems by line", "行ごとの問題"),
    "ds.list": ("Stored datasets (every version)", "保存済みデータセット（全バージョン）"),
    "ds.pick": ("Dataset version", "データセットのバージョン"),
    "ds.preview": ("Preview", "プレビュー"),
    "ds.page": ("Page", "ページ"),
    "ds.prev": ("Previous", "前へ"),
    "ds.next": ("Next", "次へ"),
    "ds.page_info": ("Rows {start}-{end} of {total}", "{total} 行中 {start}〜{end} 行目"),
    "ds.hist": ("Token lengths (embedded model's tokenizer)", "トークン長の分布（内蔵モデルのトークナイザー）"),
    "ds.hist_button": ("Count tokens", "トークン数を数える"),
    "ds.token_summary": ("{rows} rows, {total} tokens in all; min {min}, mean {mean}, max {max}.",
                         "{rows} 行、合計 {total} トークン。最小 {min}、平均 {mean}、最大 {max}。"),
    "ds.delete": ("Delete this version", "このバージョンを削除"),
    "ds.deleted": ("Deleted {id}.", "{id} を削除しました。"),
    "ds.none": ("Upload a dataset first.", "まずデータセットをアップロードしてください。"),
    "ds.not_uploaded": ("Nothing was saved: only a file dropped or chosen in this upload box can be imported. "
                        "Drop the file again.",
                        "保存していません。取り込めるのは、このアップロード欄にドロップまたは選択したファイルだけです。"
                        "もう一度ファイルをドロップしてください。"),
    # train
    "tr.setup": ("What to train", "学習の対象"),
    "tr.base": ("Base model", "ベースモデル"),
    "tr.dataset": ("Dataset", "データセット"),
    "tr.method": ("Method", "手法"),
    "tr.method_info": ("LoRA trains small adapter matrices; full fine-tuning trains every weight.",
                       "LoRA は小さなアダプター行列だけを学習し、フル ファインチューニングは全ての重みを学習します。"),
    "tr.lora": ("LoRA", "LoRA"),
    "tr.full": ("Full fine-tuning", "フル ファインチューニング"),
    "tr.qlora": ("QLoRA (4-bit base)", "QLoRA（4 ビット量子化ベース）"),
    "tr.qlora_no_gpu": ("Unavailable: QLoRA needs a CUDA GPU and none was found.",
                        "利用できません: QLoRA には CUDA GPU が必要ですが、見つかりませんでした。"),
    "tr.qlora_gpu": ("Not available in this version yet; use LoRA.",
                     "このバージョンではまだ利用できません。LoRA を使ってください。"),
    "tr.model_name": ("Name of the new model", "新しいモデルの名前"),
    "tr.model_name_info": ("Registry name; default: <base model>-<dataset>.",
                           "レジストリでの名前。省略時は「ベースモデル名-データセット名」。"),
    "tr.hyper": ("Hyperparameters", "ハイパーパラメーター"),
    "tr.advanced": ("More settings", "その他の設定"),
    "tr.recommend": ("Recommend settings for this machine", "このマシン向けのおすすめ設定"),
    "tr.recommended": ("Recommended for {device} and a model of {params} parameters: {summary}",
                       "{device}・パラメーター数 {params} のモデル向けのおすすめ: {summary}"),
    "tr.estimate": ("Estimate", "見積もり"),
    "tr.estimate_button": ("Estimate memory", "メモリを見積もる"),
    "tr.est_memory": ("Peak memory: about **{memory}** ({available} available now)",
                      "ピークメモリ: 約 **{memory}**（現在の空き {available}）"),
    "tr.est_checkpointing": ("Activation checkpointing will be turned on so that it fits.",
                             "メモリに収めるため、アクティベーション チェックポイントを有効にします。"),
    "tr.est_no_fit": (("Does not fit even with activation checkpointing: lower the batch size or the max "
                       "sequence length, or pick a smaller model."),
                      ("アクティベーション チェックポイントを使っても収まりません。バッチサイズか最大シーケンス長を"
                       "下げるか、より小さいモデルを選んでください。")),
    "tr.est_speed": ("Speed: about {tps} tokens/s", "速度: 約 {tps} トークン/秒"),
    "tr.est_trainable": (("Trainable parameters: **{trainable}** of {total} ({percent:.2f}%); "
                          "adapter file about {size}."),
                         "学習するパラメーター: {total} 中 **{trainable}**（{percent:.2f}%）。アダプターのファイルは約 {size}。"),
    "tr.est_full": ("Full fine-tuning trains all **{total}** parameters.",
                    "フル ファインチューニングでは **{total}** 個すべてのパラメーターを学習します。"),
    "tr.start": ("Start training", "学習を開始"),
    "tr.started": ("Job **{id}** is {status}. Follow it in the job monitor.",
                   "ジョブ **{id}** は{status}です。ジョブモニターで進み具合を確認できます。"),
    "tr.pick_dataset": ("Pick a dataset first (upload one on the Datasets page).",
                        "先にデータセットを選んでください（データセットのページでアップロードできます）。"),
    # TrainSpec fields (labels; Japanese tooltips; English tooltips come from spec.py)
    "f.r": ("LoRA rank (r)", "LoRA ランク（r）"),
    "f.lora_alpha": ("LoRA alpha", "LoRA アルファ"),
    "f.lora_dropout": ("LoRA dropout", "LoRA ドロップアウト"),
    "f.target_modules": ("Target modules", "対象モジュール"),
    "f.learning_rate": ("Learning rate", "学習率"),
    "f.num_train_epochs": ("Epochs", "エポック数"),
    "f.max_steps": ("Max steps", "最大ステップ数"),
    "f.per_device_train_batch_size": ("Batch size", "バッチサイズ"),
    "f.gradient_accumulation_steps": ("Gradient accumulation steps", "勾配累積ステップ数"),
    "f.max_seq_length": ("Max sequence length", "最大シーケンス長"),
    "f.warmup_steps": ("Warm-up steps", "ウォームアップ ステップ数"),
    "f.lr_scheduler_type": ("LR schedule", "学習率スケジュール"),
    "f.weight_decay": ("Weight decay", "重み減衰"),
    "f.seed": ("Seed", "乱数シード"),
    "f.packing": ("Packing", "パッキング"),
    "f.assistant_only_loss": ("Loss on assistant tokens only", "アシスタントのトークンだけで損失を計算"),
    "f.max_new_tokens": ("Max new tokens", "最大生成トークン数"),
    "f.temperature": ("Temperature", "温度"),
    "f.top_p": ("Top-p", "Top-p"),
    "f.repetition_penalty": ("Repetition penalty", "繰り返しペナルティ"),
    "i.base_model": ("", ("ベースモデル: 内蔵の「smollm2-135m-instruct」、Hugging Face の ID、"
                          "ローカルのモデル ディレクトリまたは .gguf ファイル。")),
    "i.r": ("LoRA rank: size of the low-rank update matrices.", "LoRA のランク。低ランク更新行列の大きさです。"),
    "i.lora_alpha": ("", "LoRA のスケーリング係数。更新量は lora_alpha / r 倍されます。"),
    "i.lora_dropout": ("", "学習中、LoRA の入力にかけるドロップアウト率。"),
    "i.target_modules": ("", "LoRA を付けるモジュール。「all-linear」または q_proj,v_proj のような名前。"),
    "i.learning_rate": ("", "AdamW の最大学習率。"),
    "i.num_train_epochs": ("", "学習データを何周するか。"),
    "i.max_steps": ("", "このステップ数で学習を止めます（-1 ならエポック数に従う）。"),
    "i.per_device_train_batch_size": ("", "各デバイスで 1 ステップに使う例の数。"),
    "i.gradient_accumulation_steps": ("", "勾配を何ステップ分足し合わせてから重みを更新するか。"),
    "i.max_seq_length": ("", "これより長い例はこのトークン数で切り詰めます。"),
    "i.warmup_steps": ("", "学習率を線形に上げていくウォームアップのステップ数。"),
    "i.lr_scheduler_type": ("", "ウォームアップ後の学習率の変化のさせ方。"),
    "i.weight_decay": ("", "AdamW の重み減衰。"),
    "i.seed": ("", "データの順序・分割・初期化に使う乱数シード。"),
    "i.packing": ("", "パディングなしのバッチ: 例をつなげつつ、注意は各例の中に閉じます。"),
    "i.assistant_only_loss": ("", "アシスタントのトークンだけで学習します（chat 形式と alpaca 形式）。"),
    "i.max_new_tokens": ("", "生成するトークン数の上限。"),
    "i.temperature": ("", "0 は貪欲法（毎回同じ出力）。大きいほどランダムになります。"),
    "i.top_p": ("", "Nucleus サンプリング: 確率の合計がこの値になる最小のトークン集合から選びます。"),
    "i.repetition_penalty": ("", "1 より大きいと同じトークンの繰り返しを抑えます。"),
    # monitor
    "mon.job": ("Job", "ジョブ"),
    "mon.compare": ("Overlay another run", "別の実行と重ねて表示"),
    "mon.progress": ("Progress", "進捗"),
    "mon.summary": ("**{status}**: step {step} of {total} ({percent}%), loss {loss}, {eta}",
                    "**{status}**: {total} ステップ中 {step}（{percent}%）、損失 {loss}、{eta}"),
    "mon.eta": ("about {eta} left", "残り約 {eta}"),
    "mon.done_in": ("finished", "完了"),
    "mon.waiting": ("waiting for a worker", "ワーカーを待っています"),
    "mon.loss": ("Training loss", "学習損失"),
    "mon.lr": ("Learning rate", "学習率"),
    "mon.logs": ("Log (tail)", "ログ（末尾）"),
    "mon.cancel": ("Cancel job", "ジョブをキャンセル"),
    "mon.cancelled": ("Cancel requested for {id}.", "{id} のキャンセルを要求しました。"),
    "mon.error": ("Failed: {code}: {message}", "失敗: {code}: {message}"),
    "mon.result": ("Result: model **{model}**. Try it in the playground.",
                   "結果: モデル **{model}**。プレイグラウンドで試せます。"),
    "mon.tracking": ("Tracking ({name}): `{where}`", "記録（{name}）: `{where}`"),
    "mon.try": ("Try it in the playground", "プレイグラウンドで試す"),
    "mon.pick": ("Pick a job.", "ジョブを選んでください。"),
    # playground
    "pg.model": ("Model", "モデル"),
    "pg.compare_model": ("Compare with", "比較するモデル"),
    "pg.side_by_side": ("Side by side: send each prompt to both models", "左右比較: 同じプロンプトを両方のモデルに送る"),
    "pg.system": ("System prompt (optional)", "システムプロンプト（省略可）"),
    "pg.prompt": ("Message", "メッセージ"),
    "pg.placeholder": ("Ask something, then press Enter", "質問を入力して Enter を押してください"),
    "pg.send": ("Send", "送信"),
    "pg.clear": ("Clear", "クリア"),
    "pg.sampling": ("Sampling", "サンプリング設定"),
    "pg.chat": ("Chat", "チャット"),
    "pg.chat_b": ("Comparison", "比較"),
    "pg.base_suffix": ("base", "ベース"),
    "pg.runtime_llamacpp": ("Runtime: llama.cpp (GGUF on the CPU)", "実行環境: llama.cpp（GGUF・CPU）"),
    "pg.runtime_transformers": ("Runtime: transformers (PyTorch)", "実行環境: transformers（PyTorch）"),
    "pg.runtime_unavailable": ("Runtime: not available for this model (see LORALAB_SERVING_RUNTIME)",
                               "実行環境: このモデルには使えません（LORALAB_SERVING_RUNTIME を確認してください）"),
    # models
    "mdl.table": ("Registry: fine-tuned versions with lineage", "レジストリ: 系譜つきのファインチューニング済みバージョン"),
    "mdl.pick": ("Model version", "モデルのバージョン"),
    "mdl.details": ("Lineage and metrics", "系譜と評価指標"),
    "mdl.stage": ("Stage", "ステージ"),
    "mdl.set_stage": ("Set stage", "ステージを変更"),
    "mdl.deploy": ("Deploy", "デプロイ"),
    "mdl.rollback": ("Roll back", "ロールバック"),
    "mdl.delete": ("Delete", "削除"),
    "mdl.done": ("{action}: {id} (stage {stage}, deployed {deployed}).",
                 "{action}: {id}（ステージ {stage}、デプロイ {deployed}）。"),
    "mdl.deleted": ("Deleted {id}.", "{id} を削除しました。"),
    "mdl.none": ("No fine-tuned models yet: train one first.", "ファインチューニング済みのモデルはまだありません。先に学習してください。"),
    # models: export (issue 18)
    "exp.title": ("### Export", "### エクスポート"),
    "exp.format": ("Format", "形式"),
    "exp.format.merged": ("Merged safetensors (transformers, vLLM)", "マージ済み safetensors（transformers・vLLM 用）"),
    "exp.format.gguf": ("GGUF file (llama.cpp)", "GGUF ファイル（llama.cpp 用）"),
    "exp.format.ollama": ("GGUF + Ollama Modelfile", "GGUF と Ollama 用 Modelfile"),
    "exp.quantization": ("GGUF tensor type", "GGUF のテンソル型"),
    "exp.q.f16": ("f16 (16-bit, most exact)", "f16（16 ビット・最も正確）"),
    "exp.q.q8_0": ("q8_0 (8-bit, about half the size)", "q8_0（8 ビット・サイズは約半分）"),
    "exp.start": ("Start export", "エクスポートを開始"),
    "exp.started": ("Queued export `{id}`.", "エクスポート `{id}` をキューに入れました。"),
    "exp.existing": ("The same export `{id}` is already {status}: showing it.",
                     "同じ設定のエクスポート `{id}` はすでに{status}です。それを表示しています。"),
    "exp.pick": ("Exports of this version", "このバージョンのエクスポート"),
    "exp.none": ("No exports of this version yet: choose a format and start one.",
                 "このバージョンのエクスポートはまだありません。形式を選んで開始してください。"),
    "exp.pick_model": ("Pick a model version first.", "先にモデルのバージョンを選んでください。"),
    "exp.status": ("**{status}** · {what}", "**{status}**（{what}）"),
    "exp.stage.merging": ("merging the adapter into the base model", "アダプターをベースモデルにマージ中"),
    "exp.stage.converting": ("converting to GGUF", "GGUF に変換中"),
    "exp.stage.quantizing": ("quantizing and writing tensors", "テンソルを量子化して書き込み中"),
    "exp.stage.writing": ("writing files", "ファイルを書き込み中"),
    "exp.waiting": ("waiting for a worker", "ワーカーの空きを待っています"),
    "exp.eta": ("about {eta} left", "残り約 {eta}"),
    "exp.files": ("**Download** ({size} in total; the links work for this session only):",
                  "**ダウンロード**（合計 {size}。リンクはこのセッションの間だけ有効です）:"),
    "exp.ollama": ("Then, in the folder with the downloaded files: `{command}`",
                   "ダウンロードしたファイルのあるフォルダーで次を実行します: `{command}`"),
    "exp.error": ("**{code}**: {message}", "**{code}**：{message}"),
    "exp.warnings": ("Warnings", "警告"),
    "exp.cancel": ("Cancel export", "エクスポートを中止"),
    "exp.cancelled": ("Cancel requested for `{id}`.", "`{id}` の中止を要求しました。"),
    "stage.draft": ("draft", "下書き"),
    "stage.staging": ("staging", "ステージング"),
    "stage.production": ("production", "本番"),
    "stage.archived": ("archived", "アーカイブ"),
    "yes": ("yes", "はい"),
    "no": ("no", "いいえ"),
}


def register_strings(strings: dict[str, tuple[str, str]]) -> None:
    """Add a page's own (English, Japanese) strings; a key defined twice with other text is a bug."""
    for key, pair in strings.items():
        if key in STRINGS and STRINGS[key] != pair:
            raise ValueError(f"UI string {key!r} is already defined with other text")
        STRINGS[key] = pair


def t(lang: str, key: str, **values: Any) -> str:
    """The string `key` in `lang` (English when the Japanese one is empty), formatted with `values`."""
    en, ja = STRINGS[key]
    text = ja if lang == "ja" and ja else en
    return text.format(**values) if values else text


def pick_language(accept_language: str | None) -> str:
    """The first supported language in an Accept-Language header (q-values respected), else English."""
    ranked = []
    for index, part in enumerate((accept_language or "").split(",")):
        tag, _, params = part.strip().partition(";")
        match = re.search(r"q=([0-9.]+)", params)
        quality = float(match.group(1)) if match else 1.0
        ranked.append((-quality, index, tag.strip().lower().split("-")[0]))
    for _, _, tag in sorted(ranked):
        if tag in LANGUAGES:
            return tag
    return DEFAULT_LANGUAGE


def format_bytes(size: float | None) -> str:
    """Binary-unit size such as 1.5 GiB."""
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def format_count(count: float | None) -> str:
    """Parameter-style count such as 135.0M."""
    if count is None:
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(count) >= size:
            return f"{count / size:.1f}{unit}"
    return str(int(count))


def format_seconds(seconds: float | None, lang: str) -> str:
    """A short duration: 1h 02m, 3m 10s, 42s (時間/分/秒 in Japanese)."""
    if seconds is None:
        return "-"
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    units = ("時間", "分", "秒") if lang == "ja" else ("h ", "m ", "s")
    if hours:
        return f"{hours}{units[0]}{minutes:02d}{units[1]}".strip()
    if minutes:
        return f"{minutes}{units[1]}{secs:02d}{units[2]}".strip()
    return f"{secs}{units[2]}"


class Labels:
    """Components registered with string keys per property, relabelled together when the language changes."""

    def __init__(self) -> None:
        self.items: list[tuple[Any, dict[str, Any]]] = []

    def add(self, component: Any, **keys: Any) -> Any:
        """Register `component`; each keyword is a property (label, info, value, placeholder, choices...)."""
        self.items.append((component, keys))
        return component

    @property
    def components(self) -> list[Any]:
        return [component for component, _ in self.items]

    def updates(self, lang: str) -> list[Any]:
        """One gr.update per registered component, in registration order."""
        import gradio as gr

        return [gr.update(**{prop: _resolve(lang, key) for prop, key in keys.items()}) for _, keys in self.items]


def _resolve(lang: str, key: Any) -> Any:
    if callable(key):
        return key(lang)
    if isinstance(key, list):  # choices: [(key, value), ...]
        return [(t(lang, label), value) for label, value in key]
    return t(lang, key)


def field_info(model: Any, name: str) -> Callable[[str], str]:
    """Tooltip of a spec field: its description from spec.py in English, the translation in Japanese."""
    description = model.model_fields[name].description or ""
    return lambda lang: t(lang, f"i.{name}") if lang == "ja" else description
