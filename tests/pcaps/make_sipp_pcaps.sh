#!/usr/bin/env bash
# Record the SIPp captures in this folder with real tools: SIPp UAC -> SIPp UAS on
# loopback, captured by tcpdump. Run as root from anywhere: bash tests/pcaps/make_sipp_pcaps.sh
#   sample.pcap    10 calls over UDP (the README's bundled sample)
#   sipp_tcp.pcap  5 calls over TCP, one connection (SIPp -t t1)
# Timestamps and ports differ on each recording; tests compare with tshark on the same
# file, so a re-recording needs no hand-written expectations.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

record() { # name transport port calls
  local name=$1 t=$2 port=$3 calls=$4
  tcpdump -i lo -s 0 -U -w "$work/$name.pcap" "port $port" 2>/dev/null &
  local tcpd=$!; pids+=($tcpd)
  sleep 1
  (cd "$work" && exec timeout 60 sipp -sn uas -i 127.0.0.1 -p "$port" -t "$t" -nostdin -trace_err >/dev/null) &
  local uas=$!; pids+=($uas)
  sleep 0.5
  (cd "$work" && timeout 60 sipp -sn uac -i 127.0.0.1 -p $((port + 1)) -t "$t" -m "$calls" -r 5 -d 200 \
      127.0.0.1:"$port" -nostdin -trace_err >/dev/null) || true
  sleep 1
  kill "$uas" 2>/dev/null || true; wait "$uas" 2>/dev/null || true
  kill "$tcpd"; wait "$tcpd" 2>/dev/null || true
  cp "$work/$name.pcap" "$here/$name.pcap"
}

record sample u1 5070 10
record sipp_tcp t1 5090 5
ls -l "$here/sample.pcap" "$here/sipp_tcp.pcap"
