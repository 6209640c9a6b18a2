"""Where a request's content comes from: the node, its peers, or upstream, fetched once."""
