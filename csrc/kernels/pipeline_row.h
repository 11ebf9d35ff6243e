// One row's D2F block-state transition (the D2F spec's steps 1-4 and 7), shared by the CPU loop
// and the CUDA thread-per-row kernel so that both devices run the very same code. Mirrors
// d2f_ext.reference.pipeline_step: apply the last forward's counts and EOS (step 6's
// bookkeeping), finish blocks (7), then plan the next forward: add (1), activate (2), done (3),
// window and commit span (4).
#pragma once
#include "params.h"

namespace d2f {

// Fractions in double, exactly as the reference computes them, so that a threshold hit exactly
// (e.g. 0.5 of a 32-token block) decides the same way on every device.
D2F_HOST_DEVICE inline bool decoded_at_least(const int32_t* len, const int32_t* masked, int i,
                                             double threshold) {
  return static_cast<double>(len[i] - masked[i]) / static_cast<double>(len[i]) >= threshold;
}

D2F_HOST_DEVICE inline void pipeline_row(int32_t* row, int32_t* blocks, const int32_t* counts,
                                         int32_t eos_block, int num_blocks, int block_size,
                                         double block_add_threshold, double decoded_token_threshold) {
  // A step after the row finished (a device-side loop may not know yet) must change nothing.
  if (row[kFinished]) return;
  int32_t* start = blocks + kStart * num_blocks;
  int32_t* len = blocks + kLen * num_blocks;
  int32_t* masked = blocks + kMasked * num_blocks;
  int32_t* state = blocks + kState * num_blocks;
  int32_t* fully_activated = blocks + kFullyActivated * num_blocks;

  int n = row[kNumBlocks];
  if (n < 1 || n > num_blocks) {  // not a state init_rows makes: never index past the blocks
    row[kFinished] = 1;
    row[kWinLen] = 0;
    row[kCommitLen] = 0;
    return;
  }
  for (int i = 0; i < num_blocks; ++i) masked[i] -= counts[i];
  if (eos_block >= 0 && (row[kEosBlock] < 0 || eos_block < row[kEosBlock])) row[kEosBlock] = eos_block;

  // 7. In order, so that a run of decoded blocks reaches to_cache in one pass once the active
  // block in front of it is done.
  bool earlier_active = false;
  for (int i = 0; i < n; ++i) {
    if (state[i] == kActive && masked[i] == 0 && !earlier_active) state[i] = kToCache;
    earlier_active = earlier_active || state[i] == kActive;
  }

  // 1. add; the budget, not NB, bounds a row, so rows of one batch may differ in max_new_tokens
  const int32_t next_start = start[n - 1] + len[n - 1];
  const int32_t budget_left = row[kPromptLen] + row[kGenLen] - next_start;
  if (n < num_blocks && budget_left > 0 && row[kEosBlock] < 0 &&
      decoded_at_least(len, masked, n - 1, block_add_threshold)) {
    const int32_t block_len = budget_left < block_size ? budget_left : block_size;
    start[n] = next_start;
    len[n] = block_len;
    masked[n] = block_len;
    state[n] = kActive;
    fully_activated[n] = 0;
    row[kNumBlocks] = ++n;
  }
  // 2. activate
  for (int i = 0; i + 1 < n; ++i)
    if (decoded_at_least(len, masked, i, decoded_token_threshold)) fully_activated[i + 1] = 1;

  // 3. done; with an EOS decoded, the blocks after its block cannot change the output.
  const int eos = row[kEosBlock];
  const int last = eos < 0 ? n : eos + 1;
  bool any_active = false;
  int64_t masked_all = 0, masked_to_eos = 0;
  for (int i = 0; i < n; ++i) {
    any_active = any_active || state[i] == kActive;
    masked_all += masked[i];
    if (i < last) masked_to_eos += masked[i];
  }
  if ((eos < 0 && !any_active && masked_all == 0) || (eos >= 0 && masked_to_eos == 0)) {
    row[kFinished] = 1;
    row[kWinLen] = 0;
    row[kCommitLen] = 0;
    return;
  }

  // 4. Blocks reach to_cache in order and in_cache after that, so the to_cache span (if any)
  // starts at the cache end and the window always does too.
  const int32_t win_start = row[kCacheLen];
  int32_t commit = 0;
  for (int i = 0; i < n; ++i) {
    if (state[i] == kToCache) {
      commit += len[i];
      state[i] = kInCache;
    }
  }
  row[kWinStart] = win_start;
  row[kWinLen] = start[n - 1] + len[n - 1] - win_start;
  row[kCommitLen] = commit;
  row[kCacheLen] = win_start + commit;
  row[kForwards] += 1;
}

}  // namespace d2f
