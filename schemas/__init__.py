"""The contract: events, stored documents and object keys shared by podsweep's services and its subscribers.

Imports nothing from services/ or podsweep/. JSON Schema exports live in schemas/json/ (podsweep schemas export).
"""
