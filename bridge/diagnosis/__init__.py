"""Remote diagnosis: which events need a clinician, and who answers them.

:mod:`bridge.diagnosis.rules` decides, for each event on ``<prefix>.events``, which
diagnosis rules of the cluster configuration it matches (pure, no I/O: it runs on
every event); a match opens a case. :mod:`bridge.diagnosis.handlers` holds what
answers a claimed case: a command run with the event on stdin
(:class:`~bridge.diagnosis.handlers.ExecHandler`), a webhook that receives a FHIR
subscription notification (:class:`~bridge.diagnosis.handlers.WebhookHandler`) or
an in-process callable (:class:`~bridge.diagnosis.handlers.CallbackHandler`); each
returns a validated FHIR resource (a DiagnosticReport, ClinicalImpression,
Communication, ...) that is published as the case's result. Neither module ever
logs or reports event content: ids, rule names, codes and statuses only.
"""
