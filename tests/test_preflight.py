"""The checks a run makes on its datasets' indexes before anything starts (trainer.preflight),
given the indexes as facts; `python -m trainer` refusing a real dataset: tests/data/test_runs.py."""

from __future__ import annotations

import pytest

from trainer.config import ConfigError, load
from trainer.data.sources import Source, builtin_index
from trainer.preflight import check_datasets


def index(kind="hf", sha="a" * 64, eod=2, vocab=400, name="hf:tok"):
    return {"vocab_size": vocab, "separator": eod,
            "tokenizer": {"kind": kind, "name": name, "vocab_size": vocab, "sha256": sha,
                          "eod_id": eod, "eod_token": None}}


def sources(*urls):
    return [Source(f"data.sources[{i}]", url, url) for i, url in enumerate(urls)]


def test_a_vocabulary_the_model_lacks_is_refused_naming_the_dataset():
    run = load(["model.vocab_size=256", "data.sources=[{path:/d/web},{path:/d/code}]"])
    web, code = sources("/d/web", "/d/code")
    with pytest.raises(ConfigError) as caught:
        check_datasets(run, indexes={web: index(vocab=256), code: index(vocab=400)})
    assert str(caught.value) == (
        "model.vocab_size=256: the dataset /d/code (data.sources[1], tokenizer hf:tok) has "
        "token ids up to 399; use a vocabulary of at least 400")
    check_datasets(load(["model.vocab_size=400"]), indexes={web: index(), code: index()})


@pytest.mark.parametrize("other", [index(sha="b" * 64), index(eod=3), index(kind="tiktoken"),
                                   builtin_index()])
def test_datasets_of_different_tokenizers_are_refused(other):
    run = load(["model.vocab_size=512"])
    web, code = sources("/d/web", "/d/code")
    with pytest.raises(ConfigError, match=r"^data.sources\[1\]='/d/code': tokenized with .*, but "
                                          r"data.sources\[0\] with hf:tok \(end of document 2, "
                                          r"sha256 aaaaaaaaaaaa\); the datasets of a run must "
                                          r"share one tokenizer$"):
        check_datasets(run, indexes={web: index(), code: other})


def test_a_held_out_fraction_needs_document_ends():
    run = load(["data.eval=0.1", "model.vocab_size=512"])
    (web,) = sources("/d/web")
    with pytest.raises(ConfigError, match=r"^data.eval='0.1': /d/web .* has no end-of-document"):
        check_datasets(run, indexes={web: index(kind="ids", sha=None, eod=None)})
    check_datasets(run, indexes={web: index()})


def test_document_masking_asked_for_needs_document_ends_and_a_family_model():
    (web,) = sources("/d/web")
    with pytest.raises(ConfigError, match=r"^data.document_mask=True: /d/web .* has no "
                                          r"end-of-document token"):
        check_datasets(load(["data.document_mask=true", "model.vocab_size=512"]),
                       indexes={web: index(kind="ids", sha=None, eod=None)})
    check_datasets(load(["model.vocab_size=512"]),  # null: the data decides, nothing refused
                   indexes={web: index(kind="ids", sha=None, eod=None)})
    with pytest.raises(ConfigError, match=r"^data.document_mask=True: masks a model family's"):
        load(["data.document_mask=true", "model._target_=pytorch_lightning.LightningModule"])


def test_data_of_another_tokenizer_than_the_pretrained_models_is_refused(tmp_path):
    from tokenizer_files import hf_tokenizer_dir

    from trainer.data import load_tokenizer
    from trainer.preflight import _pretrained_vocabulary, check_pretrained_tokenizer

    model_dir = hf_tokenizer_dir(tmp_path / "model")  # a model directory's tokenizer.json
    ours = load_tokenizer(f"hf:{model_dir}").record()
    other = load_tokenizer(f"hf:{hf_tokenizer_dir(tmp_path / 'other', vocab_size=300)}").record()
    run = load(["model.vocab_size=512"])
    run.model.init_from = str(model_dir)
    vocabulary = _pretrained_vocabulary(run)
    assert vocabulary == (ours["vocab_sha256"], 400)
    web, code = sources("/d/web", "/d/code")
    same, ids = {**index(), "tokenizer": ours}, index(kind="ids", sha=None)
    check_pretrained_tokenizer(run, vocabulary=vocabulary, indexes={web: same, code: ids})
    for theirs, name in ((other, "hf:"), (builtin_index()["tokenizer"], "bytes")):
        with pytest.raises(ConfigError) as caught:
            check_pretrained_tokenizer(run, vocabulary=vocabulary,
                                       indexes={web: same, code: {**index(), "tokenizer": theirs}})
        assert str(caught.value).startswith(
            f"model.init_from='{model_dir}': its tokenizer.json (400 tokens) is not the tokenizer "
            f"/d/code (data.sources[1]) was prepared with ({name}")
        assert str(caught.value).endswith(f"prepare the data with --tokenizer hf:{model_dir}")
    run.model.init_from = str(tmp_path)  # no tokenizer.json there: nothing to compare
    assert _pretrained_vocabulary(run) is None
