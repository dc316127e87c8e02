//! Plain English text that prompts are cut from. Written for this crate; it mixes subjects, registers,
//! numbers and punctuation so that token windows look like ordinary user text rather than one
//! repeated pattern that a tokenizer would compress unusually well.

pub(crate) const CORPUS: &str = "\
The harbour town woke slowly on winter mornings. Before the bakery opened, the only sound was the \
tide working against the old stone wall, and the gulls arguing over whatever the night boats had \
left behind. By seven the fishmonger had chalked his prices on a board: cod at nine, mackerel at \
four, and a note that the crab would come later if the weather held. Nobody believed the note, \
because the weather never held past noon in January.

To bake a simple loaf you need flour, water, salt and time. Mix five hundred grams of flour with \
three hundred and fifty grams of warm water and leave it for half an hour; the flour drinks the \
water and the dough becomes easier to work. Add ten grams of salt and a little yeast, then fold \
the dough over itself every thirty minutes for two hours. Shape it gently, let it rise until it \
springs back slowly when pressed, and bake it in a very hot oven with a tray of water underneath. \
The crust should sing as it cools.

Dear Margaret, thank you for the parcel, which arrived on Tuesday in remarkably good condition \
given the state of the roads. The children have already eaten most of the biscuits and are now \
arguing about who gets to keep the tin. We are all well, although the roof over the back kitchen \
has begun to leak again and your brother insists he can fix it himself. I have hidden the ladder.

A train leaving the city at dawn passes first through the rail yards, then through miles of \
warehouses with their shutters still closed, and only after forty minutes reaches open country. \
There the line follows a river for a while. Herons stand in the shallows like grey umbrellas, and \
in autumn the fields on either side are striped with the shadows of hedges. The conductor walks \
the length of the train twice, once to check tickets and once, it seems, simply to stretch his legs.

The night sky holds more than most people ever notice. On a clear evening away from street lights \
you can see perhaps two thousand stars without a telescope, along with the faint band of the Milky \
Way and, if you know where to look, the smudge of the Andromeda galaxy, two and a half million \
light years away. Planets give themselves away by not twinkling: their light comes from a small \
disc rather than a single point, so the turbulence of the air averages out.

Question: why does a spoon left in a cup of tea feel hot at the handle? Answer: metal conducts \
heat well, so energy flows from the hot liquid along the spoon until the whole of it is warmer \
than your hand. A wooden spoon stays cool for the opposite reason. Cooks have known this for \
centuries, which is why the handles of good pans are often made of wood or wrapped in something \
that conducts poorly.

In the garden, the beans went in at the end of April, a row of twenty along the fence where they \
would get the afternoon sun. Three were eaten by slugs within a week. The rest climbed quickly, \
and by July there were more beans than the household could eat, so jars of them were given to the \
neighbours, who returned the favour with courgettes, which nobody wanted either.

The committee met on the third Thursday of the month in the library annex. Minutes of the previous \
meeting were approved with one correction: the budget for new shelving was eight hundred pounds, \
not eighteen hundred. The treasurer reported that the roof fund stood at 4,212 pounds and 50 \
pence. Under any other business, Mr Patel raised the question of the car park lights, which had \
been broken since October, and was asked to write a letter to the council.

Learning a language as an adult is humbling. You can read a newspaper headline long before you \
can follow a conversation at normal speed, and you will spend months understanding every word \
of a sentence without grasping what it means. Then, one day, a joke lands. You laugh before you \
have translated it, and you realise that something has changed in the way you listen.

Maintenance log, pump station two. Monday: pressure low on the east line, valve four replaced. \
Tuesday: readings normal. Wednesday: alarm at 03:14, traced to a loose sensor cable, secured. \
Thursday: inspection by the regional engineer, no faults found. Friday: oil changed on both \
motors, filters due again in six weeks. Weekend cover arranged with the north depot.

Every map is a set of decisions about what to leave out. A walker's map shows footpaths, stiles \
and the shape of the ground in brown contour lines; a road atlas ignores all of that and shows \
petrol stations instead. Neither is wrong. The trouble begins only when someone forgets which \
kind of map they are holding and sets off across a marsh that the road atlas never mentioned.

She opened the shop at nine, as she had every day for thirty one years, and turned the sign on \
the door from closed to open. The first customer wanted a single button to match a coat. The \
second wanted advice about a wedding present and left with nothing. The third was a boy of about \
ten who had saved up for a pocket knife and counted out the coins on the counter one by one.

Rivers do not run straight for long. Any small bend sends faster water to the outside of the \
curve, which erodes that bank, while slower water on the inside drops its sand and silt. Over \
years the bend grows deeper and wider, and eventually two bends may meet, cutting off a loop that \
becomes a quiet crescent of a lake. Old maps of a valley often show the river somewhere else.

The recipe card was stained and soft at the corners. It called for two eggs, a cup of sugar, half \
a cup of butter, a cup and a half of flour, a spoon of baking powder and a pinch of salt, with \
lemon zest if you had it. At the bottom, in different ink, someone had added: double it, the \
cousins are coming. Nobody could remember which cousins, or which year.

A good meeting has a purpose that everyone can state in one sentence, a list of the decisions it \
must reach, and an end time that is respected. A bad meeting has none of these and lasts until \
the coffee runs out. Most meetings fall somewhere in between, and the best thing a chair can do \
is to ask, near the start, what would have to be true for this hour to have been worth it.

When the power failed that evening, the street became a different place. People came out of \
their houses with candles and torches, and neighbours who had nodded to each other for years \
stood talking at their gates. Someone brought out a camping stove and made tea for anyone who \
wanted it. When the lights came back two hours later, there was a small groan of disappointment.
";
