"""Metering: microphone-usage events into the ledger, hourly usage_tracking rows, period totals and limits.

- `events`: the event model, its validation and the exact split of an event across UTC hours (pure);
- `tracking`: the hourly usage_tracking rows and their conversation keys (shared with rebuild-usage);
- `limits`: the 80 % / 100 % alerts and the subscription's limit mark;
- `pipeline`: a batch of raw events screened and applied in one set-based transaction.
"""
