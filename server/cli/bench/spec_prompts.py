"""The prompt set of `customllm bench spec`: code edits (the answer repeats most of the code it was
given) and summaries (the answer quotes its source), the tasks where prompt lookup pays. Written for
this project; each is (kind, name, user message)."""
from __future__ import annotations

_INVENTORY = '''class Inventory:
    def __init__(self):
        self.items = {}

    def add(self, name, count):
        if count <= 0:
            raise ValueError("count must be positive")
        self.items[name] = self.items.get(name, 0) + count

    def remove(self, name, count):
        if self.items.get(name, 0) < count:
            raise ValueError("not enough " + name)
        self.items[name] -= count
        if self.items[name] == 0:
            del self.items[name]

    def total(self):
        return sum(self.items.values())
'''

_STATS = '''def mean(values):
    total = 0
    for value in values:
        total = total + value
    return total / len(values)


def variance(values):
    average = mean(values)
    total = 0
    for value in values:
        total = total + (value - average) * (value - average)
    return total / len(values)
'''

_FETCH = '''async function loadUsers(client) {
  const response = await client.get("/users");
  if (response.status !== 200) {
    throw new Error("failed to load users: " + response.status);
  }
  const users = response.data.users;
  return users.map((user) => ({ id: user.id, name: user.name, email: user.email }));
}
'''

_CONFIG = '''[server]
host = "127.0.0.1"
port = 8000
workers = 4

[cache]
size_gib = 2
block_size = 16

[logging]
level = "info"
file = "/var/log/server.log"
'''

_LIGHTHOUSE = ("The lighthouse on Marrow Point was built in 1871 after three ships were lost on the rocks "
               "in a single winter. Its first keeper, Ada Lindqvist, kept the lamp burning for thirty-two "
               "years and wrote a daily log that is now kept in the town library. In 1952 the light was "
               "automated, and the keeper's cottage became a small museum. Today the museum shows the "
               "original lens, the keeper's log and photographs of the ships that passed the point. The "
               "lighthouse is open to visitors from May to September, and the climb to the lamp room has "
               "one hundred and twelve steps.")

_MEETING = ("Minutes of the planning meeting. Present: Priya, Tom, Lena and Marcus. Priya reported that the "
            "new billing service is ready for testing and that the migration of old invoices will take two "
            "weeks. Tom said the mobile app release is delayed by one week because of a crash on older "
            "phones. Lena proposed moving the weekly meeting from Monday to Tuesday; everyone agreed. "
            "Marcus asked for two more people on the support team before the summer. Decisions: the billing "
            "service goes to testing on the 3rd, the app release moves to the 17th, and the weekly meeting "
            "is on Tuesdays from now on.")

_RECIPE = ("To make the bread, mix 500 grams of flour, 10 grams of salt and 7 grams of dry yeast in a large "
           "bowl. Add 350 millilitres of warm water and mix until no dry flour is left. Cover the bowl and "
           "let the dough rise for two hours. Shape the dough into a loaf, place it in a greased tin and let "
           "it rise for another hour. Bake at 220 degrees for 35 minutes, until the crust is brown and the "
           "loaf sounds hollow when tapped.")

_REPORT = ("Quarterly report. Revenue grew by 12 percent to 4.2 million euros, driven by the new subscription "
           "plans. Costs rose by 5 percent, mostly from hiring in the support team. The number of active "
           "customers reached 18,000, up from 15,500 in the previous quarter. Churn fell from 3.1 percent "
           "to 2.4 percent. The company plans to open an office in Lisbon in the next quarter and to launch "
           "the annual plan in April.")

SPEC_PROMPTS: tuple[tuple[str, str, str], ...] = (
    ("code", "rename-method",
     f"Rename the method `total` to `count_all` in this class. Reply with the whole class.\n\n{_INVENTORY}"),
    ("code", "add-docstrings",
     f"Add a one-line docstring to each function below. Reply with the complete code.\n\n{_STATS}"),
    ("code", "rename-variable",
     f"In this JavaScript function, rename `users` to `people`. Show the full function.\n\n{_FETCH}"),
    ("code", "edit-config",
     f"Change the port to 9000 and the log level to \"debug\" in this file. Reply with the whole file.\n\n"
     f"{_CONFIG}"),
    ("summary", "lighthouse",
     f"Summarise this text in a few sentences, keeping its facts.\n\n{_LIGHTHOUSE}"),
    ("summary", "meeting",
     f"List the decisions taken in this meeting, quoting the minutes.\n\n{_MEETING}"),
    ("summary", "recipe",
     f"Rewrite this recipe as a numbered list of steps.\n\n{_RECIPE}"),
    ("summary", "report",
     f"Summarise the key figures of this report.\n\n{_REPORT}"),
)
