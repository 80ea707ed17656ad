"""Integrations with the frameworks embedfill's users build on (``contrib.django``)."""
