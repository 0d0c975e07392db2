"""The offline CLIP tokenizer reproduces SD v1.4's ids; the token layout is right."""

import logging

import pytest
import torch

from memtrain.core.tokenizer import build_clip_tokenizer
from memtrain.core.text import token_layout, tokenize


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return build_clip_tokenizer(root / "eot"), build_clip_tokenizer(root / "bang", pad_token="!")


def test_ids_match_sd14(tokenizers):
    eot_tok, bang_tok = tokenizers
    assert eot_tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(eot_tok) == 49408
    assert eot_tok.pad_token_id == 49407
    ids = tokenize(eot_tok, ["a photo of a cat"])[0]
    assert ids.shape == (77,) and (ids[7:] == 49407).all()
    assert bang_tok.pad_token_id == 0
    ids = tokenize(bang_tok, ["a photo of a cat"])[0]
    assert ids[6] == 49407 and (ids[7:] == 0).all()


def test_layout_positions(tokenizers):
    eot_tok, bang_tok = tokenizers
    for tok in tokenizers:
        ids = tokenize(tok, ["a photo of a cat", "dog"])
        layout = token_layout(ids, tok.eos_token_id)
        assert layout.sot[:, 0].all() and layout.sot.sum() == 2
        assert layout.prompt[0].nonzero().flatten().tolist() == [1, 2, 3, 4, 5]
        assert layout.prompt[1].nonzero().flatten().tolist() == [1]
        assert layout.eot_index.tolist() == [6, 2]
        assert layout.pad.sum(1).tolist() == [70, 74]
        # the four groups partition every row
        total = layout.sot.int() + layout.prompt.int() + layout.eot.int() + layout.pad.int()
        assert (total == 1).all()


def test_long_prompt_truncated_with_warning(tokenizers, caplog):
    eot_tok, _ = tokenizers
    with caplog.at_level(logging.WARNING):
        ids = tokenize(eot_tok, ["cat " * 100])
    assert "truncated" in caplog.text
    layout = token_layout(ids, eot_tok.eos_token_id)
    assert layout.eot_index.item() == 76 and layout.pad.sum() == 0
    assert torch.equal(ids[0, -1], torch.tensor(49407))
