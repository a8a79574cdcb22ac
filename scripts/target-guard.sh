#!/usr/bin/env bash
# Keeps the shared build cache ($CARGO_TARGET_DIR) from filling the disk.
#
# The target dir lives outside the clone so CI runs reuse builds, but every
# change of features or dependencies leaves the previous test binaries behind.
# A full disk does not fail cleanly: the linker dies with SIGBUS. Before a
# build this script frees space when the disk is short or the cache is large:
# first incremental state and stale test binaries, then, if that is not
# enough, the whole cache (the next build is cold, not broken).
set -euo pipefail
target="${CARGO_TARGET_DIR:?CARGO_TARGET_DIR must be set}"
min_free_gib="${PAPERCLIP_ENV_MIN_FREE_GIB:-12}"
max_target_gib="${PAPERCLIP_ENV_MAX_TARGET_GIB:-30}"

[ -d "$target" ] || exit 0

free_gib() { df -Pk "$target" | awk 'NR==2 { print int($4 / 1048576) }'; }
target_gib() { du -sk "$target" 2>/dev/null | awk '{ print int($1 / 1048576) }'; }
short() { [ "$(free_gib)" -lt "$min_free_gib" ] || [ "$(target_gib)" -gt "$max_target_gib" ]; }

short || exit 0
echo "target-guard: $(free_gib) GiB free, cache $(target_gib) GiB; pruning $target"
rm -rf "$target"/debug/incremental "$target"/release/incremental
# Test, bench and example executables not touched for a day are leftovers of
# earlier feature sets or dependency versions; cargo relinks any it still needs.
find "$target"/debug/deps "$target"/debug/examples "$target"/release/deps \
    -maxdepth 1 -type f -executable -mtime +0 -delete 2>/dev/null || true
if short; then
    echo "target-guard: still short ($(free_gib) GiB free); removing the whole cache"
    rm -rf "$target"
fi
echo "target-guard: $(free_gib) GiB free"
