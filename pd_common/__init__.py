"""pd_common: what the router and the worker share, with no dependency beyond the standard library.

Modules
  error_envelope the OpenAI error envelope (APIError, error_body, the SSE error event) of router and worker
  json_body      request bodies as bounded JSON (depth, int64 integers, no NaN): one 400 at the edge
  cluster_auth   the cluster secret: HMAC tokens on the PD control plane (router -> workers' bootstrap
                 fields, D -> P links and routes, workers -> router registrations)

Both ``router`` (which imports nothing of the worker) and ``sglang_pd``/``transfer`` import from here;
this package imports nothing of theirs.
"""
