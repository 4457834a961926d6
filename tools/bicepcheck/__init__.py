"""Offline checks of the Bicep deployment (bicep/): full-grammar parse, resource bodies against Azure's generated type
definitions, resource names against Azure's naming rules, model deployments against a dated snapshot of Azure OpenAI
model availability and retirements. `python -m tools.bicepcheck` runs them all over every bicep/*.bicepparam.
"""
