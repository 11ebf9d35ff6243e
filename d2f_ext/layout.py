"""Field indices of the pipeline state tensors, mirroring csrc/kernels/params.h.

rows:   int32 [B, NUM_ROW_FIELDS]
blocks: int32 [B, NUM_BLOCK_FIELDS, NB], NB >= 1 + ceil(GEN_LEN / block_size) (block 0 = prompt)
Row coordinates are compact: the prompt without padding at [0, prompt_len), generation block k
at prompt_len + (k - 1) * block_size; the last block is shorter when GEN_LEN (the row's
max_new_tokens) is not a multiple of block_size.
"""

# rows
NUM_BLOCKS, EOS_BLOCK, FINISHED, CACHE_LEN, WIN_START, WIN_LEN, COMMIT_LEN, FORWARDS, PROMPT_LEN, GEN_LEN = range(10)
NUM_ROW_FIELDS = 10
# blocks
START, LEN, MASKED, STATE, FULLY_ACTIVATED = range(5)
NUM_BLOCK_FIELDS = 5
# block states
ACTIVE, TO_CACHE, IN_CACHE = range(3)
# confidence used by the forced pick
CONF_PROBABILITY, CONF_MARGIN, CONF_NEG_ENTROPY = range(3)
CONFIDENCES = {"default": CONF_PROBABILITY, "margin_confidence": CONF_MARGIN,
               "neg_entropy": CONF_NEG_ENTROPY}
