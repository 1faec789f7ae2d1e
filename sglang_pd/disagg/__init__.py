"""disagg: prefill/decode disaggregation as scheduler hooks around the one engine (no fork of it).

Modules
  hooks           SchedulerHooks, the seam the scheduler calls (NullHooks for a colocated worker)
  prefill         PrefillHooks: bootstrap queue -> (scheduler) waiting/running -> inflight while KV is sent
  decode          DecodeHooks: prealloc queue -> transfer queue -> (scheduler) running, no prompt forward
  bootstrap_info  BootstrapInfo and the parsing of the router's bootstrap fields
  live_rooms      LiveRooms: one live request per bootstrap_room on this worker
  transfer_meta   meta_info["kv_transfer"] of a PD request, from its room's stats
  factory         --disaggregation-mode -> the hooks and transfer engine a worker runs with
"""
