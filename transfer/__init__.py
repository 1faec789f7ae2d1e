"""transfer: prefill -> decode KV movement (bootstrap server/client, UCX engine, fake engine, state machine).

May import kernels (pack/unpack) and nothing from sglang_pd. Built in the PD issue.
"""
