"""The special token ids every vocabulary starts with.

tfjax.data.tokenizer maps a loaded sentencepiece model onto these; text ids
follow them, and image placeholders sit between BOI and EOI.
"""
PAD_ID, BOS_ID, EOS_ID, BOI_ID, EOI_ID = 0, 1, 2, 3, 4
