"""Reporting: everything here reads records, never the engine.

Run records, accuracies with intervals, the leaderboard and its figures, dashboards and the
end-of-sweep callback.
"""
