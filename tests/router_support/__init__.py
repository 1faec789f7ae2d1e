"""Router test support: a fake worker with failure knobs (``mock_worker``), its answers
(``mock_answers``), and helpers that run routers, mocks and real workers as processes (``procs``)."""
