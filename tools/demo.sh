#!/bin/bash
# The demo that "make run" shows: a Maildir backend (lmtp_proxy.maildir_backend)
# in the background for each NAME=HOST:PORT, delivering under DEMO_DIR/NAME,
# then the proxy command in the foreground.  When the proxy exits (on Ctrl-C
# too) the backends are stopped by their PIDs, and so is every backend when
# one cannot start.
#
#   tools/demo.sh PYTHON DEMO_DIR "NAME=HOST:PORT ..." PROXY_COMMAND...
#
# The backends are a development aid, never part of the proxy's service.
set -eu

if [ $# -lt 4 ]; then
    echo "usage: $0 PYTHON DEMO_DIR \"NAME=HOST:PORT ...\" PROXY_COMMAND..." >&2
    exit 2
fi
python=$1 demo=$2 backends=$3
shift 3

pids=()
stop_backends() {
    if [ ${#pids[@]} -gt 0 ]; then
        kill -TERM "${pids[@]}" 2>/dev/null || true
        wait "${pids[@]}" 2>/dev/null || true
    fi
}
trap stop_backends EXIT

listening() {
    (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null
}

for backend in $backends; do
    address=${backend#*=}
    # Would look ready while the backend itself fails to listen.
    if listening "$address"; then
        echo "demo: $address is in use; stop whatever listens there (another make run?)" >&2
        exit 1
    fi
done

mkdir -p "$demo"
for backend in $backends; do
    name=${backend%%=*} address=${backend#*=}
    # Ctrl-C signals the whole foreground process group.  Ignoring it here
    # keeps the backends up while the proxy's graceful stop lets the
    # deliveries in flight finish; they are stopped after the proxy.
    (
        trap '' INT
        exec "$python" -m lmtp_proxy.maildir_backend \
            --name "$name" --listen "$address" --root "$demo/$name"
    ) &
    pids+=($!)
done

# The proxy starts only once every backend listens, so the first mail sent
# after its start-up lines finds them.
index=0
for backend in $backends; do
    pid=${pids[$index]} name=${backend%%=*} address=${backend#*=}
    index=$((index + 1))
    for _ in {1..100}; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "demo: the $name backend could not start (its log is above)" >&2
            exit 1
        fi
        listening "$address" && continue 2
        sleep 0.1
    done
    echo "demo: the $name backend does not listen on $address after 10 s" >&2
    exit 1
done

"$@"
