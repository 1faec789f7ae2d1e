"""server: the worker's HTTP server and its three processes (main, scheduler, detokenizer).

Modules
  app                 the aiohttp application: middlewares plus native and OpenAI routes
  http_common         JSON body reading (bounded), SSE writing, the error and auth middlewares
  errors              the OpenAI error envelope (APIError -> {"error": {...}})
  native_api          SGLang's native routes: /generate, health, info, cache and abort control, /metrics
  openai_api          /v1/completions, /v1/chat/completions, /v1/models
  openai_protocol     OpenAI request parsing shared by both routes, and the common output parts
  openai_completions  /v1/completions: parsing, the response object, the stream's chunks
  openai_chat         /v1/chat/completions: message validation, the response object, the stream's chunks
  server_state        ServerState: what every handler reaches through ``request.app["srv"]``
  tokenizer_manager   TokenizerManager (main): tokenizes and validates, tracks in-flight requests
  req_state           what main keeps per in-flight request (output so far, timing, awaited chunks)
  stream_merge        several requests of one HTTP call: chunks merged as they come, or final states
  messages            typed msgpack messages between the processes
  ipc                 ZMQ plumbing: private ipc:// endpoints, typed send/recv
  scheduler_process   the scheduler process: EngineCore in a loop of receive -> step -> send
  detokenizer         the detokenizer process: token ids -> text deltas, stop-string trimming
  child_process       child-process hygiene: die with the parent, signals, logging
  metrics             worker metrics with SGLang's names (server-owned registry)
  registration        --register-with: announce this worker to a router once healthy, withdraw on shutdown

Data flow: HTTP -> native_api/openai_api -> tokenizer_manager -(ZMQ)-> scheduler_process
-(ZMQ)-> detokenizer -(ZMQ)-> tokenizer_manager -> req_state -> the handler's response.
"""
