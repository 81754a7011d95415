"""Stripe: signed webhooks into an inbox, each event applied to the learner's subscription, and a daily
reconciliation with Stripe's API for what webhooks missed.

- `webhook`: verify a delivery and store it in `stripe_events` (the web process).
- `payloads`: pure readers of Stripe objects, in every API shape the worker meets.
- `handlers`: one event applied to the per-subscription state and the user's `subscriptions` row.
- `inbox`: an inbox row processed exactly once, dead letters replayed, lost messages swept.
- `api`: Stripe's API (the subscription as it is now, the event log), with one retry policy.
- `reconcile`: `stripe.reconcile` / `python -m worker stripe-reconcile`.

The package is `worker.stripe`; its modules import the Stripe library as `import stripe` (absolute).
"""
