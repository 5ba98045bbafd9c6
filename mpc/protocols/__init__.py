"""Protocols: functions of local shares, a context (communicator and dealer), returning local shares."""
