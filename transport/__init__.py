"""The wire between actors and the learner, torch-free: the message codec (``wire``), the
learner-side ingest server (``ingest``), the actor-side link (``link``) and its spool of
unacked chunks (``spool``)."""
