"""The four stages of the chain, one module and one entry function each.

profile.run_profile, extract.run_extract, distill.run_distill, router.run_router.
They know nothing of RQ or Redis: they talk to whoever runs them through a StageContext.
"""
