"""Bits per byte counted from exactly the scored tokens: the UTF-8 bytes of the eval
windows' targets (a per-token byte table) against a direct decode of the same windows, for
bytes, a byte-level BPE with a BOS per document (which packing keeps at each document's
position 0), and SentencePiece."""
from __future__ import annotations

import math

import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer, processors

from jaxpar.data import DEFAULT_CORPUS, pack
from jaxpar.data import prepare as prep
from jaxpar.data.tokens import TokenDataset

N, B, NB = 48, 4, 3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    text = DEFAULT_CORPUS.read_text()[:40_000]
    docs = text[:text.rindex("\n\n")].split("\n\n")
    path.write_text("\n\n".join(d + " — café ✓" for d in docs))  # multi-byte characters
    return path


def _bpe_with_bos(tmp_path, corpus):
    """A trained byte-level BPE given a BOS special token its post-processor adds."""
    prep.prepare([corpus], tmp_path / "plain", train_tokenizer=400, progress=False)
    tok = Tokenizer.from_file(str(tmp_path / "plain" / "tokenizer.json"))
    tok.add_special_tokens([AddedToken("<|bos|>", special=True)])
    bos = tok.token_to_id("<|bos|>")
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A",
                                                       special_tokens=[("<|bos|>", bos)])
    tok.save(str(tmp_path / "bos.json"))
    return str(tmp_path / "bos.json")


def _metaspace_bpe(tmp_path, corpus):
    """A tokenizer.json built like Llama-2's: Metaspace pre-tokenizer, byte fallback, and
    the decoder that turns ▁ into spaces and strips the text's first one."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tok.train([str(corpus)], trainers.BpeTrainer(vocab_size=700, special_tokens=specials,
                                                 show_progress=False))
    tok.save(str(tmp_path / "metaspace.json"))
    return str(tmp_path / "metaspace.json")


def _sentencepiece(tmp_path, corpus):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=512, byte_fallback=True, minloglevel=2,
                                   character_coverage=0.98)
    return str(tmp_path / "sp.model")


def _direct_bytes(ds: TokenDataset, ids: np.ndarray) -> int:
    """UTF-8 bytes of the text of `ids` decoded by the tokenizer itself, special tokens
    dropped. SentencePiece drops the space of a first piece "▁x" on decode: decode after an
    anchor piece and subtract it."""
    tok = ds.tokenizer
    if tok.kind == "hf":  # (after an anchor too: a Metaspace decoder strips the first space)
        t, anchor = tok._tok, [tok._tok.token_to_id("a")]
        whole = t.decode(anchor + [int(i) for i in ids], skip_special_tokens=True)
        return len(whole.encode()) - len(t.decode(anchor).encode())
    if tok.kind == "sentencepiece":
        anchor = [tok._sp.piece_to_id("a")]
        whole = tok._sp.decode(anchor + [int(i) for i in ids])
        return len(whole.encode()) - len(tok._sp.decode(anchor).encode())
    return len(bytes(np.asarray(ids, np.uint8)))


@pytest.mark.parametrize("kind", ["bytes", "bpe_bos", "metaspace", "sentencepiece"])
def test_eval_bytes_are_those_of_the_scored_tokens(tmp_path, corpus, kind):
    spec = {"bytes": lambda: "bytes", "bpe_bos": lambda: _bpe_with_bos(tmp_path, corpus),
            "metaspace": lambda: _metaspace_bpe(tmp_path, corpus),
            "sentencepiece": lambda: _sentencepiece(tmp_path, corpus)}[kind]()
    m = prep.prepare([corpus], tmp_path / "ds", tokenizer=spec, progress=False,
                     eval_fraction=0.3)
    assert m["tokenizer"]["add_bos"] == (kind == "bpe_bos")
    ds = TokenDataset(tmp_path / "ds", seq_len=N)
    with pytest.raises(ValueError, match="eval_rows"):
        ds.bits_per_byte(1.0)
    got, want, bos_targets = 0, 0, 0
    for j in range(NB):
        toks, docs = ds.eval_rows(j, range(B), B, NB)
        if kind == "bpe_bos":  # packed: every document start inside a window is one BOS
            b = pack(toks, doc_ids_BN1=docs)  # at position 0 of its segment, BOS elsewhere
            bos = b["tokens"] == m["tokenizer"]["bos_id"]  # never
            starts = docs[:, 1:-1] != docs[:, :-2]  # (a window may begin inside a document)
            assert bos.any() and np.array_equal(bos[:, 1:], starts)
            assert (b["positions"][bos] == 0).all()
        for row in toks:
            targets = row[1:]
            got += int(ds.token_bytes[targets].sum())
            want += _direct_bytes(ds, targets)
            bos_targets += int((targets == m["tokenizer"]["bos_id"]).sum()) if kind != "bytes" \
                else 0
    assert got == want == ds.eval_target_bytes(B, NB)
    assert (bos_targets > 0) == (kind == "bpe_bos")  # BOS targets scored, with no bytes
    loss = 2.5
    assert ds.bits_per_byte(loss) == pytest.approx(loss * B * NB * N / math.log(2) / want,
                                                   rel=1e-12)
    if kind == "bytes":
        assert ds.bits_per_byte(loss) == pytest.approx(loss / math.log(2), rel=1e-12)
