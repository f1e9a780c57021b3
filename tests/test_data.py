"""Embedded corpus, tokenizer and packed batches."""
import numpy as np
import torch

from training.data import TokenStream, default_corpus, packed_batch, split_documents
from training.tokenizer import Tokenizer


def test_corpus_is_prose_and_split_is_disjoint():
    docs = default_corpus()
    assert len(docs) > 50 and sum(map(len, docs)) > 150_000, (len(docs), sum(map(len, docs)))
    assert not any(line.startswith((" ", "|", "+-")) for d in docs for line in d.splitlines())
    train, held = split_documents(docs, 0.05)
    assert held and train and not set(train) & set(held) and len(train) + len(held) == len(docs)
    train_paragraphs = {p for d in train for p in d.splitlines()}
    assert not any(p in train_paragraphs for d in held for p in d.splitlines()), "held-out text seen in training"


def test_tokenizer_trains_roundtrips_and_reloads(tmp_path):
    docs = default_corpus()[:20]
    tok = Tokenizer.train(docs, 512, str(tmp_path / "tok.model"))
    text = "Assignment statements bind names — even ünïcödé 🙂 falls back to bytes."
    assert tok.decode(tok.encode(text)) == text
    again = Tokenizer(str(tmp_path / "tok.model"))
    assert again.vocab_size == 512 and again.encode(text) == tok.encode(text)
    assert (tok.pad_id, tok.eos_id) == (0, 3) and tok.sp.id_to_piece(3) == "</s>"


def test_packed_batch_marks_boundaries():
    stream = TokenStream.from_docs([[10, 11, 12], [20], [30, 31]], eos_id=3)
    # stream: 10 11 12 3 | 20 3 | 30 31 3
    ids, targets, seq_idx = packed_batch(stream, np.array([1, 0]), seq_len=6)
    assert ids[0].tolist() == [11, 12, 3, 20, 3, 30]
    assert seq_idx[0].tolist() == [0, 0, 0, 1, 1, 2]
    assert targets[0].tolist() == [12, 3, -100, 3, -100, 31]
    assert seq_idx.dtype == torch.int32 and ids.dtype == torch.int64
