#!/bin/bash
# Mount vs smolvm cp throughput: 500 MiB, median of 3 (see docs/benchmarks.md).
set -e
S=${SMOLVM:-bin/smolvm}
B=${BENCH_DIR:-/var/tmp/smolvm-mountbench}
N=${N:-3}
rm -rf "$B"; mkdir -p "$B/ro" "$B/rw" "$B/out"
head -c 500M /dev/urandom > "$B/ro/big"
$S rm -f mb >/dev/null 2>&1 || true
$S create --name mb -m 1536 --mount "$B/ro:/ro" --mount "$B/rw:/rw:rw" >/dev/null
t() { local s=$(date +%s.%N); "$@" >/dev/null; local e=$(date +%s.%N); echo "$s $e" | awk '{printf "%.1f\n", 500/($2-$1)}'; }
for i in $(seq $N); do
  $S exec mb -- sh -c 'rm -f /tmp/big; sync; echo 3 > /proc/sys/vm/drop_caches'
  r=$(t $S exec mb -- cp /ro/big /tmp/big)
  h=$($S exec mb -- sha256sum /tmp/big | cut -c1-12)
  $S exec mb -- rm -f /tmp/big
  ci=$(t $S cp "$B/ro/big" mb:/tmp/big)
  rm -f "$B/rw/big"
  w=$(t $S exec mb -- sh -c 'cp /tmp/big /rw/big && sync')
  rm -f "$B/out/big"
  co=$(t $S cp mb:/tmp/big "$B/out/big")
  echo "run $i: mount read $r MiB/s, cp in $ci MiB/s, mount write $w MiB/s, cp out $co MiB/s (guest hash $h, host $(sha256sum "$B/rw/big" | cut -c1-12))"
done
$S rm -f mb >/dev/null
rm -rf "$B"
