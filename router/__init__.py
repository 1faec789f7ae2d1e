"""router: the aiohttp front door (PD and regular modes, policies, health, worker registry).

It speaks HTTP only and imports nothing from sglang_pd, transfer or kernels. Built in the router issue.
"""
