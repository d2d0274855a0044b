#!/usr/bin/env bash
# Local Petals 2.2.0 swarm on loopback only: 1 DHT bootstrap peer + 3 servers (blocks 0:10, 10:20, 20:30).
# Usage: run_swarm.sh start | stop | status
set -u
D=/tmp/petals
PY=$D/venv/bin/python
MODEL=/root/.cache/pymesh/models/SmolLM2-135M-Instruct
PREFIX=SmolLM2-135M-Instruct-hf
LOG=$D/logs
mkdir -p $LOG $D/ids $D/cache

# 1 torch/BLAS thread per process; fully offline; any stray HTTP(S) request (petals' PyPI version check) fails fast.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 http_proxy=http://127.0.0.1:9 https_proxy=http://127.0.0.1:9
export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost
export PYTHONUNBUFFERED=1

BOOT_PORT=31340

start() {
  : > $D/pids
  # bootstrap DHT peer (new swarm: no --initial_peers)
  setsid $PY -m petals.cli.run_dht --host_maddrs /ip4/127.0.0.1/tcp/$BOOT_PORT \
      --identity_path $D/ids/boot.key > $LOG/dht.log 2>&1 &
  echo $! >> $D/pids
  BOOT=""
  for i in $(seq 1 120); do
    BOOT=$(grep -o "/ip4/127.0.0.1/tcp/$BOOT_PORT/p2p/[A-Za-z0-9]*" $LOG/dht.log | head -1)
    [ -n "$BOOT" ] && break
    sleep 1
  done
  [ -z "$BOOT" ] && { echo "bootstrap did not come up"; tail -20 $LOG/dht.log; exit 1; }
  echo "$BOOT" > $D/initial_peer.txt
  echo "bootstrap: $BOOT"

  n=0
  for r in 0:10 10:20 20:30; do
    port=$((BOOT_PORT + 1 + n))
    setsid $PY -m petals.cli.run_server $MODEL \
        --block_indices $r --dht_prefix $PREFIX \
        --initial_peers $BOOT \
        --host_maddrs /ip4/127.0.0.1/tcp/$port --announce_maddrs /ip4/127.0.0.1/tcp/$port \
        --identity_path $D/ids/server$n.key \
        --device cpu --torch_dtype float32 --quant_type none \
        --num_handlers 1 --throughput 1 \
        --cache_dir $D/cache \
        > $LOG/server$n.log 2>&1 &
    echo $! >> $D/pids
    n=$((n + 1))
  done
  echo "started pids: $(tr '\n' ' ' < $D/pids)"
}

stop() {
  [ -f $D/pids ] || { echo "no pids file"; return; }
  for p in $(cat $D/pids); do kill -TERM -- -$p 2>/dev/null; done   # each was started with setsid -> own process group
  sleep 5
  for p in $(cat $D/pids); do kill -KILL -- -$p 2>/dev/null; done
  sleep 1
  echo "remaining:"; pgrep -a -f "/tmp/petals/venv" ; pgrep -a -f "hivemind_cli/p2pd" | grep /tmp/petals
  true
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) for f in $LOG/*.log; do echo "== $f"; tail -3 $f; done ;;
  *) echo "usage: $0 start|stop|status" ;;
esac
