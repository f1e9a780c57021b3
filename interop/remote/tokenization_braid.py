"""BraidTokenizer: braidlm's sentencepiece model (tokenizer.model) for `AutoTokenizer`. Self-contained (copied
into every exported model directory). Text is encoded and decoded by sentencepiece itself, exactly as braidlm
does (no BOS/EOS added, byte fallback, no normalization beyond the model's own)."""
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend


class BraidTokenizer(SentencePieceBackend):
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>", **kwargs):
        kwargs.setdefault("padding_side", "left")  # braidlm's models take left padding only
        super().__init__(vocab_file=vocab_file, unk_token=unk_token, bos_token=bos_token, eos_token=eos_token,
                         pad_token=pad_token, legacy=True, **kwargs)

    def _tokenize(self, text, **kwargs):
        return self.sp_model.encode(text, out_type=str)

    def convert_tokens_to_string(self, tokens):
        return self.sp_model.decode_pieces(list(tokens))

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        return list(token_ids_0) + ([] if token_ids_1 is None else list(token_ids_1))

    def _decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None, **kwargs):
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.all_special_ids]
        return self.sp_model.decode([int(i) for i in ids])
