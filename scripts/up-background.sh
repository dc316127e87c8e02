# Sourced by the benchmark scripts: `start_cluster DIR ARGS...` starts `target/release/tandem up
# --port 0 --json ARGS...` in the background (stopped when the script exits), waits until it is
# ready and sets URL to its address. Its log goes to DIR/up.log.
start_cluster() {
  local dir=$1
  shift
  target/release/tandem up --port 0 --json "$@" >"$dir/up.json" 2>"$dir/up.log" &
  UP=$!
  trap 'kill $UP 2>/dev/null; wait $UP 2>/dev/null || true' EXIT
  for _ in $(seq 600); do
    [ -s "$dir/up.json" ] && break
    sleep 0.5
  done
  URL=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['url'])" "$dir/up.json")
  echo "cluster at $URL"
}
