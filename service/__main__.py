"""`python -m service …` is `tenantserve …`."""

from service.cli import main

main()
