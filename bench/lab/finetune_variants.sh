#!/usr/bin/env bash
# The #25 fine-tune, two variants side by side on one GPU (the tiny UNet leaves it mostly idle):
# open attributes at their defaults vs drawn at random, same rate and time. Each writes OUT/<name>.tar.NN
# (UNet, log, metrics, grids) so that everything comes back under the GPU machine's file limits.
#   bash bench/lab/finetune_variants.sh "$OUT" 5
set -u
out=${1:?OUT folder}; minutes=${2:-5}
python -m mixdq.tiny.finetune "$out/default" --minutes "$minutes" --open-attributes default --pack ft_default \
  --skip-shipped > "$out/ft_default.log" 2>&1 &
python -m mixdq.tiny.finetune "$out/random" --minutes "$minutes" --open-attributes random --pack ft_random \
  --skip-shipped > "$out/ft_random.log" 2>&1 &
wait
mv "$out"/default/ft_default.tar.* "$out"/random/ft_random.tar.* "$out"/ 2>/dev/null
rm -rf "$out/default" "$out/random"  # at most 8 files come back: keep only the parts and the logs
grep -h "time limit\|alignment" "$out"/ft_*.log | tail -20
