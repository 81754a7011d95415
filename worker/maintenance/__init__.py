"""Periodic jobs: `runner` (the advisory lock and maintenance_runs every job goes through), `jobs` (the
five beat jobs) and `progress` (usage rolled into learning progress and streaks)."""
