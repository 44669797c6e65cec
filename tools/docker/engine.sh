#!/usr/bin/env bash
# A Docker engine for `make images` and the real-node tests, where the machine has none running.
#
#   tools/docker/engine.sh start    use the engine that answers `docker info`, or start dockerd
#   tools/docker/engine.sh stop     stop dockerd if (and only if) `start` started it
#   tools/docker/engine.sh status
#
# The dockerd started here keeps its data (images, build cache) in ${BERTH_CACHE:-~/.cache/berth}/docker,
# so a later run finds the images it built, and its runtime state in /run/berth-docker. It listens on
# the default socket. It neither forwards nor NATs on the host (--ip-forward=false --ip-masq=false
# --iptables=false): containers on its bridge reach this machine only, and builds use the host's
# network (`docker build --network host`). Installs Debian's docker.io when dockerd is missing and
# apt-get can (root).
set -euo pipefail

CACHE="${BERTH_CACHE:-$HOME/.cache/berth}"
DATA="$CACHE/docker"
RUN=/run/berth-docker
PIDFILE="$RUN/dockerd.pid"
STAMP="$RUN/started-by-berth"
LOG="$CACHE/docker-dockerd.log"

log() { echo "engine.sh: $*" >&2; }

ours_running() { [[ -f "$STAMP" && -f "$PIDFILE" ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

case "${1:-}" in
  start)
    if docker info >/dev/null 2>&1; then
      ours_running && log "dockerd (started here earlier) is running" || log "using the running Docker engine"
      exit 0
    fi
    if ! command -v dockerd >/dev/null; then
      if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null; then
        log "installing Debian's docker.io"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker.io >&2
      else
        log "dockerd is not installed (Debian/Ubuntu: apt-get install docker.io)"; exit 1
      fi
    fi
    [[ $EUID -eq 0 ]] || { log "starting dockerd needs root"; exit 1; }
    mkdir -p "$DATA" "$RUN"
    rm -f "$STAMP"
    setsid dockerd --data-root "$DATA" --exec-root "$RUN/exec" --pidfile "$PIDFILE" \
      -H unix:///var/run/docker.sock --ip-forward=false --ip-masq=false --iptables=false \
      >>"$LOG" 2>&1 < /dev/null &
    echo "$!" > "$STAMP"
    for _ in $(seq 1 120); do
      if docker info >/dev/null 2>&1; then log "dockerd up (data in $DATA, log $LOG)"; exit 0; fi
      kill -0 "$(cat "$STAMP")" 2>/dev/null || { log "dockerd exited; last log lines:"; tail -20 "$LOG" >&2; exit 1; }
      sleep 0.5
    done
    log "dockerd did not answer within 60s; last log lines:"; tail -20 "$LOG" >&2; exit 1 ;;
  stop)
    if ! ours_running; then log "no dockerd started here is running"; rm -f "$STAMP"; exit 0; fi
    pid="$(cat "$PIDFILE")"
    kill -TERM "$pid"
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && { log "dockerd did not stop in 30s: SIGKILL"; kill -KILL "$pid"; }
    rm -f "$STAMP"
    log "dockerd stopped" ;;
  status)
    if docker info >/dev/null 2>&1; then
      ours_running && echo "running (started by engine.sh, data in $DATA)" || echo "running (not started by engine.sh)"
    else
      echo "not running"; exit 1
    fi ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
