"""What the API and the dashboard share: routes (`app.api`) and pages (`app.web`) stay thin and call these.

One module per concept: schemas (the bodies both speak), pagination (one cursor scheme for every list),
jobs, job_views (how a job is shown: progress, links), job_requests (checking what a job asks for),
job_events, keys, uploaded_models, datasets, uploads (capped streaming), serving (loading a published
model), budgets (what a request is charged against), inputs (decoding tensors), monitor, enforcement
(policies, held keys, actions, alerts) and sessions (the dashboard's signed-in sessions, which the API
also accepts for a GET). Imports: `app.core` and the ml entry points only.
"""
