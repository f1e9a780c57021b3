"""SentencePiece tokenizer: trained on the corpus when none is given, saved beside the run."""
from __future__ import annotations

import io
import os
import re
from typing import Iterable, Sequence

import sentencepiece as spm


class Tokenizer:
    """A SentencePiece model with pad=0, unk=1, bos=2, eos=3 and byte fallback (no text is unencodable)."""

    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"tokenizer model {model_path!r} does not exist")
        self.path = model_path
        self.sp = spm.SentencePieceProcessor(model_file=model_path)

    @classmethod
    def train(cls, docs: Iterable[str], vocab_size: int, model_path: str, model_type: str = "bpe") -> "Tokenizer":
        """Train on `docs` and write `model_path` (a .model file).

        `vocab_size` is an upper bound: a corpus too small for that many pieces gets the largest vocabulary
        sentencepiece can build from it (a note is printed); the model's embedding keeps its size and the
        unused rows are never read.
        """
        os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
        docs = list(docs)
        buf = io.BytesIO()

        def run(size: int) -> None:
            spm.SentencePieceTrainer.train(
                sentence_iterator=(line for d in docs for line in d.splitlines() if line.strip()),
                model_writer=buf, vocab_size=size, model_type=model_type, byte_fallback=True,
                pad_id=0, unk_id=1, bos_id=2, eos_id=3, character_coverage=1.0, num_threads=2,
                max_sentence_length=16384, minloglevel=2, split_digits=True, remove_extra_whitespaces=False,
                normalization_rule_name="identity")
        try:
            run(vocab_size)
        except RuntimeError as e:
            most = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", str(e))
            if most is None:
                raise
            print(f"note: the corpus supports at most {most.group(1)} pieces; training that many instead of "
                  f"{vocab_size}", flush=True)
            buf = io.BytesIO()
            run(int(most.group(1)))
        tmp = model_path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(buf.getvalue())
        os.replace(tmp, model_path)
        return cls(model_path)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    pad_id, unk_id, bos_id, eos_id = 0, 1, 2, 3

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
        """num_threads: sentencepiece's threads for the batch (-1: its default, every core)."""
        return self.sp.encode(list(texts), num_threads=num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])
