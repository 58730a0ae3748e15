"""Pure MammoFL code shared by hospitals and coordinator: records, preprocessing, models, metrics, privacy maths.

Nothing in this package imports Flower, reads hospital folders or talks to the network.
"""
