"""Server API latency and throughput: N threads, each on one keep-alive
HTTP/1.1 connection, sending the same call for D seconds.

  python3 bench/api_bench.py --url http://127.0.0.1:8080 --key KEY [--threads 4] [--seconds 10] [--call publish|history|presence]
"""
import argparse, http.client, json, threading, time, urllib.parse

def worker(args, stop, out):
    u = urllib.parse.urlparse(args.url)
    conn = http.client.HTTPConnection(u.hostname, u.port)
    headers = {"Authorization": f"Bearer {args.key}", "Content-Type": "application/json"}
    body = json.dumps({"content": "x" * args.size})
    lat, errors = [], 0
    while not stop.is_set():
        t = time.perf_counter()
        if args.call == "publish":
            conn.request("POST", f"/api/v1/channels/{args.channel}/messages", body, headers)
        elif args.call == "history":
            conn.request("GET", f"/api/v1/channels/{args.channel}/messages?limit=50", headers=headers)
        else:
            conn.request("GET", f"/api/v1/channels/{args.channel}/presence?limit=100", headers=headers)
        r = conn.getresponse()
        r.read()
        lat.append(time.perf_counter() - t)
        if r.status >= 300:
            errors += 1
    out.append((lat, errors))

def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--key", required=True)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--call", default="publish", choices=["publish", "history", "presence"])
    p.add_argument("--channel", default="general")
    p.add_argument("--size", type=int, default=100)
    args = p.parse_args()
    stop, out = threading.Event(), []
    threads = [threading.Thread(target=worker, args=(args, stop, out)) for _ in range(args.threads)]
    for t in threads: t.start()
    time.sleep(args.seconds)
    stop.set()
    for t in threads: t.join()
    lat = sorted(x for l, _ in out for x in l)
    errors = sum(e for _, e in out)
    q = lambda f: lat[min(len(lat) - 1, int(f * len(lat)))] * 1000
    print(f"{args.call}: {len(lat) / args.seconds:.0f} req/s over {args.threads} connections, "
          f"p50 {q(0.5):.2f} ms, p99 {q(0.99):.2f} ms, errors {errors}")

if __name__ == "__main__":
    main()
