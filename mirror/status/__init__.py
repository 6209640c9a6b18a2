"""What a node shows of itself: the status report, the page, `mirror status`, measuring a pull.

- `pulls.PullLog`: the last manifest and blob requests the registry front answered (a ring
  buffer the front feeds through its `PullObserver` seam).
- `collector.StatusCollector`: one JSON report of this node, its peers, what it holds, recent
  pulls, upstream health, pins and distributions, read from the parts through small protocols.
- `measure.measure_pull`: an image pulled through this node's content service into nothing,
  timed manifest by manifest and blob by blob.
- `api.StatusApi`: `GET /mirror/v1/status`, `POST /mirror/v1/measure` and, on the metrics
  address, the page at `/` (`page.PAGE`, one self-contained HTML document).
- `client`: `mirror status`, the same report as terminal tables.

Nothing below imports this package: `node.py` wires it, `cli.py` runs its client.
"""
