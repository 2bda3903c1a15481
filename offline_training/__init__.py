"""Offline training between sessions: data and splits, the one fit loop, trainers per model family, evaluation and
export to the engines the real-time side loads. May import everything else in loopcast.
"""
