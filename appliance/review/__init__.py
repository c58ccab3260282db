"""A person's review of a result: which results wait for one and the sign-off
(sign_off.py), and the signed-off result as FHIR R4 (fhir.py)."""
