"""Scoring a pool with filters into the score cache that selection reads."""
