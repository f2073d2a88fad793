"""What the API and the dashboard share: routes (`app.api`) and pages (`app.web`) stay thin and call these,
never each other. Imports: `app.core` and the ml entry points only (`ml.served`, `ml.catalog`, `ml.loading`,
`ml.audit`).

One module per concept:
- access: the settings, database session and artifact store of a request, and a key checked by its hash;
- sessions: the dashboard's signed-in sessions (the API also accepts one for a GET);
- tenancy: another owner's object is the same 404 as a missing one;
- pagination: the one cursor scheme of every list (newest first by time and id);
- schemas, enforcement_schemas: the bodies both speak;
- jobs (create, submit, list, read, cancel, artifacts, report), job_requests (checking what a job asks
  for), job_views (how a job is shown: progress, time left, links), job_events (events and their stream);
- keys; datasets; uploaded_models; uploads (capped streaming, once for every large body);
- serving (a published model loaded with what it is served through), inputs (decoding tensors), budgets
  (what a request is charged against), predictor (the predict path), monitor (the extraction monitor);
- enforcement (policies, held keys, actions, alerts), webhooks (an owner's webhooks);
- evidence (evidence of theft: challenges and verifications).
"""
