"""Print result.json's JSON Schema: ``python -m appliance.results.publish_schema``.

docs/result.schema.json is this output; tests/test_result_schema.py keeps the two equal.
"""

import json
import sys

from appliance.results.schema import result_json_schema

if __name__ == "__main__":
    json.dump(result_json_schema(), sys.stdout, indent=2)
    sys.stdout.write("\n")
