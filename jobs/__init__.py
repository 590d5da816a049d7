"""The job platform's domain, shared by the API and the workers: settings, models, state machine, storage.

No Flask and no torch here.
"""
