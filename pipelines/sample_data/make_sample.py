"""Deterministic generator for the embedded UltraClean sample crawl.

Writes, next to this script:

* ``sample.warc.gz``  -- a tiny WARC (one warcinfo record, then a request and a
  response record per page) exercising the ingest -> extract -> language id ->
  heuristic filters -> dedup path, including the awkward real-world cases.
* ``sample.jsonl.gz`` -- a dozen ``{"id", "text", "url", "date"}`` documents.

Every text below is original prose written for this project (Apache-2.0, like
the rest of the repository); no third-party crawl data is included.

The output is byte-identical on every run: WARC-Date values and
WARC-Record-IDs are fixed, warcio's gzip members carry mtime 0 (zlib's own
gzip header), and the JSONL is written through ``gzip.GzipFile(mtime=0)``.

Usage::

    python pipelines/sample_data/make_sample.py [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import gzip
import html
import io
import json
import struct
import zlib
from pathlib import Path

from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

HERE = Path(__file__).resolve().parent
WARC_NAME = "sample.warc.gz"
JSONL_NAME = "sample.jsonl.gz"
CRAWL_DAY = "2024-03-04"

# ---------------------------------------------------------------------------
# Original English articles (each 250-450 words, plain paragraphs).
# ---------------------------------------------------------------------------

ARTICLES: dict[str, dict] = {
    "bread": {
        "title": "How Bread Rises",
        "author": "Maren Holt",
        "paragraphs": [
            (
                "A loaf of bread begins as a dense, sticky lump of flour and water, yet a few hours later it has "
                "doubled in size and feels as light as a pillow. The change is the work of yeast, a single-celled "
                "fungus that has been helping bakers for thousands of years. Understanding what the yeast is doing "
                "makes it much easier to bake a good loaf at home."
            ),
            (
                "When flour is mixed with water, enzymes in the grain start to break starch down into simple sugars. "
                "Yeast cells feed on those sugars and release two main products: carbon dioxide and a small amount "
                "of alcohol. The gas forms tiny bubbles throughout the dough, and the alcohol adds to the flavour "
                "before it evaporates in the oven."
            ),
            (
                "Bubbles alone would simply escape if the dough could not hold them. This is where gluten comes in. "
                "Two proteins in wheat flour, glutenin and gliadin, join together when they are wet and worked by "
                "hand or by machine. Kneading stretches them into a network of elastic strands, rather like a net "
                "of thin balloons, which traps the gas and lets the dough expand."
            ),
            (
                "Temperature matters a great deal. Yeast is sluggish in a cold kitchen and lively in a warm one, "
                "which is why recipes often suggest leaving dough somewhere cosy. Many bakers now prefer a slow, "
                "cool rise overnight in the refrigerator, because the longer fermentation gives the bread a deeper "
                "taste and a more open crumb."
            ),
            (
                "The final burst of growth happens in the oven. As the loaf heats up, the trapped gas expands "
                "quickly and the yeast makes one last effort before the heat kills it. Bakers call this oven "
                "spring. Soon the proteins set, the starches firm up, and the outside browns into a crust. The "
                "result is a structure of millions of small holes, each one left behind by a bubble of gas that "
                "a living organism produced."
            ),
        ],
    },
    "lighthouses": {
        "title": "A Short History of Lighthouses",
        "author": "Tomas Reyne",
        "paragraphs": [
            (
                "For as long as people have sailed, they have needed a way to find safe harbour at night. The "
                "earliest guiding lights were simple fires built on hilltops near the shore. Sailors learned to "
                "recognise these beacons and to steer towards them, trusting that the keepers would not let the "
                "flames die out before dawn."
            ),
            (
                "The most famous lighthouse of the ancient world stood on the island of Pharos, near Alexandria in "
                "Egypt. It was finished in the third century before the common era and may have been taller than "
                "a modern office tower. Travellers described a great fire at the top, and the building stood for "
                "well over a thousand years before earthquakes brought it down."
            ),
            (
                "Through the Middle Ages, lights were often kept by monks or by local towns, and they burned wood, "
                "coal or candles. These fuels gave a weak and smoky glow. In the eighteenth century, oil lamps with "
                "polished reflectors made a real difference, because the mirrors gathered the light and threw it "
                "much further out to sea."
            ),
            (
                "The greatest leap came in 1822, when the French engineer Augustin Fresnel designed a new kind of "
                "lens. Instead of one thick piece of glass, his lens used rings of prisms arranged around a central "
                "lamp. It bent almost all of the light into a single powerful beam that could be seen from more "
                "than twenty miles away. Fresnel lenses were soon fitted in lighthouses around the world."
            ),
            (
                "Each lighthouse was given its own pattern of flashes, so that a captain could tell one tower from "
                "another simply by counting. Some towers were painted with stripes or bands for the same reason "
                "during the day. Today most lights are automatic and ships rely on satellite navigation, but many "
                "of the old towers still shine, and they remain some of the most loved buildings on any coast."
            ),
        ],
    },
    "tidepools": {
        "title": "Life in a Tide Pool",
        "author": "Ines Calder",
        "paragraphs": [
            (
                "Twice a day the sea draws back from rocky shores and leaves behind small pools of water trapped in "
                "hollows of stone. To a casual visitor they look like puddles, but each one is a crowded little "
                "world. Tide pools are home to animals and plants that have learned to survive conditions which "
                "change dramatically within a few hours."
            ),
            (
                "The challenge is that a pool left by the tide is cut off from the ocean. On a sunny afternoon the "
                "water warms up, some of it evaporates, and the remaining water becomes saltier. After heavy rain "
                "the opposite happens and the pool turns almost fresh. Oxygen can run low at night. Only hardy "
                "creatures are able to cope with such swings."
            ),
            (
                "Sea anemones are among the most striking residents. They look like flowers, but they are animals "
                "that catch passing food with stinging tentacles. When the water drains away they pull their "
                "tentacles inside and close up into soft blobs to keep from drying out. Mussels and barnacles "
                "shut their shells tightly for the same reason and wait for the sea to return."
            ),
            (
                "Other visitors move around more freely. Hermit crabs shuffle across the bottom in borrowed shells "
                "and trade up to a larger home as they grow. Small fish such as blennies hide under ledges, and "
                "starfish creep slowly over the rocks in search of mussels to eat. Seaweeds provide shade and "
                "shelter for all of them."
            ),
            (
                "If you explore a tide pool, move gently and watch where you step, because the rocks are slippery "
                "and many animals are easy to crush. Turn stones over carefully and always put them back the way "
                "you found them. It is best to look rather than collect. With a little patience you will notice "
                "far more life than you expected, and the pool will still be thriving when the tide comes in."
            ),
        ],
    },
    "gears": {
        "title": "How Bicycle Gears Work",
        "author": "Pavel Ostrand",
        "paragraphs": [
            (
                "Anyone who has ridden a bicycle up a steep hill knows the relief of shifting into a lower gear. "
                "Suddenly the pedals turn more easily, even though the bike moves more slowly. The idea behind "
                "this is simple, and once you understand it you can choose your gears with much more confidence."
            ),
            (
                "A typical bicycle has one or more toothed rings at the front, called chainrings, and a cluster of "
                "smaller sprockets on the rear wheel. The chain links a front ring to a rear sprocket. Each time "
                "you turn the pedals once, the chain moves a number of links equal to the teeth on the chainring, "
                "and the rear sprocket has to turn far enough to take up the same length of chain."
            ),
            (
                "Suppose the chainring has forty teeth and the rear sprocket has twenty. One turn of the pedals then "
                "turns the back wheel twice. This is a high gear, good for speed on flat roads. If you move the "
                "chain to a rear sprocket with forty teeth, one turn of the pedals turns the wheel only once. You "
                "travel a shorter distance for each stroke, but each stroke needs much less force."
            ),
            (
                "The derailleur is the device that moves the chain from one sprocket to another. When you press the "
                "shifter, a cable pulls the derailleur sideways and guides the chain onto the next sprocket while "
                "the wheel keeps turning. Some city bikes instead hide their gears inside the rear hub, which "
                "keeps them clean and lets you change gear while standing still."
            ),
            (
                "Experienced riders try to keep a steady, comfortable pedalling rhythm rather than pushing as hard "
                "as they can. They shift a moment before a climb begins, not halfway up, and they avoid running "
                "the chain at an extreme angle from the smallest ring to the smallest sprocket. Good habits like "
                "these make riding easier and help the chain and sprockets last longer."
            ),
        ],
    },
    "compost": {
        "title": "Composting at Home: A Beginner's Guide",
        "author": "Ruth Ambler",
        "paragraphs": [
            (
                "Almost a third of what many households throw away is kitchen scraps and garden trimmings. Instead "
                "of sending that material to a landfill, you can turn it into compost, a dark and crumbly soil "
                "improver that plants love. Composting takes a little attention, but it is one of the easiest ways "
                "to make a garden healthier."
            ),
            (
                "A compost heap is really a feast for microbes. Bacteria and fungi break down the waste, and they "
                "are later joined by worms, beetles and other small creatures. Like any living thing, these "
                "workers need food, water and air. If you give them a good balance of all three, they will do most "
                "of the job for you."
            ),
            (
                "Gardeners often talk about greens and browns. Greens are moist, fresh materials such as fruit "
                "peelings, coffee grounds and grass clippings, and they supply nitrogen. Browns are dry materials "
                "such as fallen leaves, straw and torn cardboard, and they supply carbon. A heap that is mostly "
                "greens tends to become slimy and smelly, while a heap that is mostly browns barely changes at all."
            ),
            (
                "Aim for roughly equal volumes of each, added in layers. Keep the pile about as damp as a wrung-out "
                "sponge, and turn it with a fork every couple of weeks to let in fresh air. Chopping large pieces "
                "into smaller ones speeds things up. Avoid adding meat, dairy and cooked food, which can attract "
                "rats, and leave out diseased plants and weeds that have gone to seed."
            ),
            (
                "In warm weather a well-managed heap can be ready in two or three months, while a neglected one may "
                "take a year or more. The compost is finished when it smells like a forest floor and you can no "
                "longer recognise what went into it. Spread it over flower beds, mix it into potting soil, or use "
                "it as a mulch around shrubs, and your plants will reward you for it."
            ),
        ],
    },
    "watercycle": {
        "title": "The Water Cycle Explained",
        "author": "Dana Whitfield",
        "paragraphs": [
            (
                "The water in a glass on your table may once have fallen as snow on a mountain, flowed down a river "
                "and floated in the ocean for centuries. Water on Earth is constantly on the move, changing between "
                "liquid, vapour and ice. Scientists call this endless journey the water cycle."
            ),
            (
                "The cycle is driven mainly by the sun. Its heat warms oceans, lakes and wet ground, and some of the "
                "water evaporates into the air as invisible vapour. Plants add more vapour through their leaves in "
                "a process known as transpiration. On a hot day a single large tree can release hundreds of litres "
                "of water this way."
            ),
            (
                "Warm, moist air rises and cools as it climbs. Cool air cannot hold as much vapour, so the water "
                "condenses onto tiny particles of dust, salt or smoke and forms droplets. Billions of these "
                "droplets together make a cloud. When the droplets collide and grow heavy enough, they fall as "
                "rain, or as snow and hail if the air is cold."
            ),
            (
                "Once it reaches the ground, water follows several paths. Some of it runs off the surface into "
                "streams and rivers and eventually returns to the sea. Some soaks into the soil and seeps down to "
                "become groundwater, which can stay underground for thousands of years. In cold regions, snow may "
                "pile up into glaciers that store water as ice for a very long time."
            ),
            (
                "The water cycle shapes weather, carves valleys and supplies the fresh water that people, animals "
                "and crops depend on. Because the total amount of water hardly changes, the cycle is also a "
                "reminder that pollution does not simply disappear. What we put into rivers and the air today "
                "will travel onwards and may fall again somewhere far away."
            ),
        ],
    },
    "catalogue": {
        "title": "How Libraries Catalogue Books",
        "author": "Eleanor Pask",
        "paragraphs": [
            (
                "Walk into any public library and you can find a single book among tens of thousands in a matter of "
                "minutes. That is possible because librarians have spent generations developing careful ways to "
                "describe and arrange their collections. The work happens quietly behind the scenes, but every "
                "visitor relies on it."
            ),
            (
                "Cataloguing starts with a description of the item itself. A cataloguer records the title, the "
                "author, the publisher, the year of publication and the number of pages, along with details such "
                "as the edition and the standard book number. These facts are entered into a shared format so that "
                "libraries all over the world can exchange records instead of describing the same book again."
            ),
            (
                "Next comes the question of what the book is about. The cataloguer assigns subject headings, which "
                "are standard phrases chosen from an agreed list. Using the same heading every time means that a "
                "reader searching for books on the history of medicine will find all of them together, even if "
                "their titles never mention medicine at all."
            ),
            (
                "Finally the book receives a call number, which decides where it will sit on the shelf. Many public "
                "libraries use the Dewey Decimal Classification, which divides knowledge into ten main classes "
                "numbered from zero to nine hundred. Science books fall in the five hundreds, for example, and "
                "history is found in the nine hundreds. University libraries often prefer a system that uses "
                "letters as well as numbers and allows finer divisions."
            ),
            (
                "Today most catalogues are online, and readers can search them from home, reserve a copy and see "
                "whether it is on the shelf. Yet the basic principles have barely changed. A good catalogue record "
                "still answers three questions clearly: what the item is, what it is about, and where it can be "
                "found."
            ),
        ],
    },
    "bees": {
        "title": "Keeping Bees in a Small Garden",
        "author": "Owen Farrier",
        "paragraphs": [
            (
                "Beekeeping can seem like a hobby for people with large farms, but many beekeepers manage one or "
                "two hives in an ordinary back garden. Honey bees will happily fly two or three miles to find "
                "flowers, so they do not need a meadow of their own. What they do need is a keeper who understands "
                "their habits and visits them regularly."
            ),
            (
                "A colony is a remarkable family. It contains a single queen, who lays all of the eggs, thousands of "
                "female worker bees, and a few hundred males called drones during the summer. Workers change jobs "
                "as they age. Young bees clean cells and feed larvae, while older bees guard the entrance and then "
                "spend the last weeks of their lives gathering nectar and pollen."
            ),
            (
                "Most hives today are built from stacked wooden boxes that hold removable frames. The bees build "
                "wax comb on each frame, which lets the keeper lift out a frame, check the brood and look for "
                "signs of disease without damaging the nest. Inspections are usually made every week or so in "
                "spring and early summer, when colonies grow fastest."
            ),
            (
                "Placing a hive with care keeps both the bees and the neighbours content. Face the entrance away "
                "from paths and doors, and put a tall hedge or fence in front of it so that the bees fly upwards "
                "soon after leaving. A shallow dish of water with a few stones in it stops them from visiting a "
                "neighbour's pond or bird bath."
            ),
            (
                "New beekeepers are wise to join a local association, where experienced members often share advice "
                "and sometimes offer spare colonies. A good veil and gloves give confidence in the first season. "
                "Harvesting honey is a pleasure, but many keepers say the real reward is simply sitting beside the "
                "hive on a warm afternoon and watching the foragers come home with their legs full of pollen."
            ),
        ],
    },
    "sundials": {
        "title": "Reading the Time from a Sundial",
        "author": "Clara Ween",
        "paragraphs": [
            (
                "Long before mechanical clocks, people told the time by watching shadows. A stick pushed into the "
                "ground casts a shadow that swings from west to east as the sun crosses the sky, and early "
                "observers noticed that its position followed the same pattern day after day. The sundial grew "
                "out of that simple observation."
            ),
            (
                "Every sundial has two essential parts. The gnomon is the edge that casts the shadow, and the dial "
                "plate carries the hour lines on which the shadow falls. On a well-made garden sundial the gnomon "
                "is tilted so that it points towards the celestial pole, which means it lies parallel to the axis "
                "of the Earth. That angle depends on the latitude where the dial is set up."
            ),
            (
                "Because the dial is built for one place, moving it to another town can make it inaccurate. A dial "
                "designed for a northern city will not work properly near the equator, since the sun follows a "
                "different path across the sky there. Careful makers always ask where a dial will stand before "
                "they mark the hours."
            ),
            (
                "Even a perfect sundial rarely agrees with a wristwatch. It shows solar time, which is based on the "
                "actual position of the sun, while our clocks keep an average time that is the same across a whole "
                "time zone. The Earth also travels around the sun at a changing speed, so solar time runs a little "
                "fast or slow through the year. The difference can reach about a quarter of an hour."
            ),
            (
                "Many old dials carry a small table or a figure-eight curve that lets the reader correct for this "
                "difference. Others bear a short motto about the passing of time, a reminder that every sunny hour "
                "counts. Whether it stands in a park or on a church wall, a sundial still works after centuries "
                "without batteries, springs or repairs."
            ),
        ],
    },
}

# The near duplicate of the lighthouse article: three words changed, one sentence added.
NEAR_DUP_LIGHTHOUSES = list(ARTICLES["lighthouses"]["paragraphs"])
NEAR_DUP_LIGHTHOUSES[0] = NEAR_DUP_LIGHTHOUSES[0].replace("simple fires", "plain fires")
NEAR_DUP_LIGHTHOUSES[2] = NEAR_DUP_LIGHTHOUSES[2].replace("a real difference", "a huge difference")
NEAR_DUP_LIGHTHOUSES[3] = NEAR_DUP_LIGHTHOUSES[3].replace("soon fitted", "quickly fitted")
NEAR_DUP_LIGHTHOUSES[4] = (
    NEAR_DUP_LIGHTHOUSES[4]
    + " Several of them now welcome visitors who climb the spiral stairs to enjoy the view."
)

# ---------------------------------------------------------------------------
# Other languages.
# ---------------------------------------------------------------------------

ZH_TEA = {
    "title": "茶的故事",
    "paragraphs": [
        (
            "茶是中国人日常生活中最常见的饮品之一。相传早在几千年前，人们就发现了茶树的叶子可以煮水饮用，"
            "最初它被当作一种药物，用来提神和解渴。后来，随着种植技术的发展，喝茶逐渐从少数人的习惯变成了家家户户的日常。"
        ),
        (
            "唐代是茶文化发展的重要时期。那时有一位名叫陆羽的学者，走遍各地的茶园，记录茶树的生长环境、采摘的时间和煮茶的方法，"
            "最后写成了一部专门讲茶的书。这部书让更多人懂得了如何挑选好茶，也让品茶成为一种讲究的艺术。"
        ),
        (
            "中国的茶大致可以分为绿茶、红茶、乌龙茶、白茶、黄茶和黑茶几类。它们的区别主要在于加工过程中发酵的程度。"
            "绿茶几乎不发酵，味道清新；红茶经过充分发酵，颜色深，口感醇厚；乌龙茶介于两者之间，香气特别丰富。"
        ),
        (
            "泡茶看似简单，其实也有不少学问。水温太高会把细嫩的绿茶烫熟，水温太低又泡不出红茶的味道。"
            "茶叶的多少、浸泡的时间和使用的茶具，都会影响最后的滋味。很多人喜欢在周末约上几位朋友，慢慢地泡一壶茶，"
            "一边聊天一边品尝，让忙碌的心情安静下来。"
        ),
    ],
}

ZH_SOLAR_TERMS = {
    "title": "二十四节气与农事",
    "paragraphs": [
        (
            "二十四节气是古人根据太阳在一年中的位置变化而总结出来的时间体系。它把一年平均分成二十四段，"
            "每一段大约十五天，每个节气都有自己的名字，比如立春、雨水、惊蛰、清明、夏至和冬至。"
        ),
        (
            "在没有现代天气预报的年代，农民主要依靠节气来安排农活。春分前后天气转暖，适合翻地和播种；"
            "芒种时节麦子成熟，田里一片忙碌；到了秋分，许多地方开始收获稻谷和玉米。一句句流传下来的农谚，"
            "把这些经验简洁地记录了下来，代代相传。"
        ),
        (
            "节气不仅和农业有关，也影响着人们的饮食和风俗。清明时节，人们外出踏青，祭扫先人；冬至这一天，"
            "北方很多家庭会包饺子，南方则有吃汤圆的习惯。这些习俗让普通的日子多了一份仪式感，也让家人有理由聚在一起。"
        ),
        (
            "今天，大多数人已经不再种地，但二十四节气依然活在日历里和生活中。它提醒我们留意季节的变化，"
            "顺应自然的节奏安排作息。看到窗外的树叶由绿变黄，或者第一场雪悄悄落下，人们常常会想起对应的节气，"
            "感受到时间流动的美好。"
        ),
    ],
}

# Written so that every character is inside GB2312.
ZH_BAMBOO_GB = {
    "title": "竹子的用处",
    "paragraphs": [
        (
            "竹子是一种生长得非常快的植物。在温暖湿润的南方，春天的竹笋破土而出，短短几个星期就能长到好几米高。"
            "竹子的根在地下四处延伸，所以一片竹林往往是由同一株竹子慢慢扩展而成的。"
        ),
        (
            "自古以来，人们就把竹子用在生活的方方面面。竹竿可以搭建房屋和桥梁，竹片可以编成篮子、席子和扇子，"
            "细细的竹枝还能做成扫帚。在纸张出现以前，古人把文字写在竹片上，再用绳子串起来，这就是最早的书。"
        ),
        (
            "竹笋也是一道受欢迎的美食。新鲜的春笋味道鲜嫩，可以炒肉、煮汤，也可以晒干以后长期保存。"
            "许多地方的人每到春天都会上山挖笋，把它当作一年中最值得期待的时令菜。"
        ),
        (
            "竹子还在文化中占有重要的位置。它的茎干挺直，中间有节，冬天也不落叶，因此常常被用来比喻正直和坚强的品格。"
            "很多画家喜欢画竹，诗人也留下了许多赞美竹子的诗句。"
        ),
    ],
}

DE_HEDGEHOG = {
    "title": "Der Igel im Garten",
    "paragraphs": [
        (
            "Der Igel gehört zu den bekanntesten Wildtieren in unseren Gärten. Tagsüber schläft er meist gut "
            "versteckt unter einer Hecke oder in einem Laubhaufen, und erst in der Dämmerung macht er sich auf "
            "die Suche nach Futter. Dabei legt er in einer Nacht oft mehrere Kilometer zurück."
        ),
        (
            "Igel fressen vor allem Käfer, Raupen, Regenwürmer und Schnecken. Deshalb sind sie für viele Gärtner "
            "willkommene Helfer. Wer den Tieren etwas Gutes tun möchte, lässt eine wilde Ecke mit Laub und "
            "Zweigen stehen und verzichtet auf Gift gegen Schnecken."
        ),
        (
            "Im Herbst fressen sich die Igel ein Fettpolster an, denn von November bis März halten sie Winterschlaf. "
            "In dieser Zeit sinkt ihre Körpertemperatur stark ab, und das Herz schlägt nur noch wenige Male in der "
            "Minute. Ein ruhiger, trockener Unterschlupf ist dann besonders wichtig. Wer im Herbst einen sehr kleinen "
            "oder geschwächten Igel findet, sollte sich an eine Igelstation wenden, statt das Tier einfach mitzunehmen."
        ),
    ],
}

FR_WINDMILLS = {
    "title": "Les moulins à vent",
    "paragraphs": [
        (
            "Pendant des siècles, les moulins à vent ont fait partie du paysage des campagnes européennes. On les "
            "construisait sur des collines ou dans des plaines dégagées, là où le vent souffle régulièrement. Leur "
            "rôle principal était de moudre le grain pour en faire de la farine."
        ),
        (
            "Le principe est assez simple. Les ailes, recouvertes de toile, captent la force du vent et font tourner "
            "un arbre en bois. Un jeu d'engrenages transmet ce mouvement à une lourde meule de pierre qui écrase les "
            "grains de blé. Le meunier devait sans cesse surveiller le ciel et orienter le moulin face au vent."
        ),
        (
            "Avec l'arrivée de la vapeur puis de l'électricité, la plupart des moulins ont été abandonnés. Aujourd'hui, "
            "des associations en restaurent certains et les ouvrent au public, qui peut ainsi découvrir un savoir-faire "
            "ancien et goûter un pain fait avec une farine moulue sur place."
        ),
    ],
}

# English text, served as ISO-8859-1 bytes with no charset declared anywhere.
LATIN1_COFFEE = {
    "title": "An Afternoon in the Old Coffee Houses",
    "paragraphs": [
        (
            "Our walking tour ended, as the best tours do, at a table by the window of Café Müller. The room has "
            "hardly changed in a century: marble tables, bentwood chairs and newspapers clipped to wooden holders. "
            "Waiters in black jackets move between the tables without hurrying, and nobody expects a guest to leave "
            "after a single cup."
        ),
        (
            "I ordered a Melange, which is close to a cappuccino, and a slice of apple strudel. My friend René "
            "chose the crème brûlée and claimed it was the finest he had eaten since his student days in Zürich. "
            "It may have been a naïve judgement, but neither of us felt like arguing on such a grey afternoon."
        ),
        (
            "The façade outside is plain, and it would be easy to walk straight past. Inside, though, the sense of "
            "déjà vu is strong for anyone who has read the old novels set in this city. Writers once worked here "
            "for hours, and a few regulars still bring notebooks. We stayed until the lamps came on, paid the "
            "patient waiter, and promised to return before the end of the year."
        ),
    ],
}

# ---------------------------------------------------------------------------
# Low-quality English pages.
# ---------------------------------------------------------------------------

SPAM_LINES = [
    "BUY CHEAP WATCHES",
    "cheap watches cheap watches cheap watches",
    "click here click here click here",
    "best price best price best price",
    "buy cheap buy cheap buy now",
    "free shipping free shipping",
    "CLICK HERE NOW",
    "cheap replica watches online",
    "cheap watches sale cheap watches sale",
    "buy cheap watches online best price",
    "click here for best price",
    "discount discount discount",
    "cheap watches cheap watches cheap watches",
    "click here click here click here",
    "best price best price best price",
    "LIMITED OFFER click here",
    "buy cheap buy cheap buy now",
    "cheap watches cheap watches cheap watches",
]
SPAM_LINKS = [
    "cheap watches",
    "buy cheap watches",
    "replica watches",
    "discount watches",
    "watches sale",
    "cheap pills",
    "buy cheap pills",
    "casino bonus",
    "free casino",
    "best price",
    "click here",
    "cheap loans",
    "fast loans",
    "buy followers",
    "cheap followers",
]

# ---------------------------------------------------------------------------
# JSONL documents.
# ---------------------------------------------------------------------------

JSONL_NEW_GOOD = [
    (
        "https://notes.example.org/kitchen/why-onions-make-you-cry",
        (
            "Cutting an onion releases a surprising amount of chemistry. When the knife breaks the cells, enzymes "
            "that were kept apart mix with sulphur compounds and produce a volatile gas. That gas drifts upwards, "
            "reaches the surface of your eyes and reacts with the moisture there, which is why they begin to sting.\n"
            "Your eyes respond by producing tears to wash the irritant away. Chilling the onion for half an hour "
            "slows the reaction, and a very sharp knife crushes fewer cells than a blunt one. Some cooks also cut "
            "near an open window or under a running extractor fan.\n"
            "None of these tricks is perfect, but together they make the job far more pleasant. The same compounds "
            "that cause the tears are also responsible for much of the flavour, so a milder onion usually tastes "
            "milder in the pan as well."
        ),
    ),
    (
        "https://notes.example.org/outdoors/reading-a-map-contour",
        (
            "Contour lines are the thin brown curves that cover most walking maps. Each line joins points that "
            "lie at the same height above sea level, so following one line would keep you on level ground.\n"
            "The spacing of the lines tells you how steep the land is. Lines packed tightly together mean a steep "
            "slope or even a cliff, while lines spread far apart show gentle country that is easy to cross. A "
            "set of closed rings usually marks a hilltop.\n"
            "With a little practice you can picture the shape of a valley or a ridge before you ever see it. "
            "That skill helps you choose a comfortable route and avoid an unpleasant surprise at the end of a long "
            "day. It is worth checking your reading against the real landscape whenever you stop for a rest."
        ),
    ),
    (
        "https://notes.example.org/home/caring-for-cast-iron",
        (
            "A cast iron pan can last for generations if it is treated well. The secret is seasoning, a thin layer "
            "of oil that has been heated until it bonds to the metal and forms a smooth, dark coating.\n"
            "After cooking, wash the pan with hot water and a brush, dry it straight away over a low flame, and "
            "wipe a few drops of oil over the surface. Leaving it wet is the quickest way to invite rust.\n"
            "If rust does appear, scrub it off, rinse the pan, and season it again in a hot oven. The pan will "
            "soon look as good as new. Many cooks find that their old pans work better every year, because each "
            "meal adds a little more to the seasoning."
        ),
    ),
    (
        "https://notes.example.org/science/why-the-sky-is-blue",
        (
            "Sunlight looks white, but it is really a mixture of every colour of the rainbow. When that light "
            "enters the atmosphere it meets countless molecules of nitrogen and oxygen.\n"
            "These molecules scatter short blue wavelengths much more strongly than long red ones. As a result, "
            "blue light is bounced around the sky in every direction and reaches our eyes from wherever we look, "
            "so the whole sky appears blue on a clear day.\n"
            "At sunrise and sunset the light has to pass through far more air before it reaches us. Most of the "
            "blue is scattered away on the journey, and the remaining light is rich in orange and red. That is "
            "why the evening sky so often glows with warm colours."
        ),
    ),
]

JSONL_SPAM = "buy cheap pills click here buy cheap pills click here best price best price"

# ---------------------------------------------------------------------------
# HTML builders.
# ---------------------------------------------------------------------------


def _esc(text: str) -> str:
    return html.escape(text, quote=False)


def article_html(
    *,
    site: str,
    title: str,
    author: str,
    paragraphs: list[str],
    nav: list[str],
    footer: str,
    lang: str = "en",
    charset: str | None = "utf-8",
    date_text: str = "4 March 2024",
    related: list[str] | None = None,
) -> str:
    meta = f'  <meta charset="{charset}">\n' if charset else ""
    nav_items = "\n".join(
        f'      <li><a href="/{n.lower().replace(" ", "-")}/">{_esc(n)}</a></li>' for n in nav
    )
    body = "\n".join(f"      <p>{_esc(p)}</p>" for p in paragraphs)
    aside = ""
    if related:
        links = "\n".join(
            f'        <li><a href="/articles/{r.lower().replace(" ", "-")}/">{_esc(r)}</a></li>'
            for r in related
        )
        aside = f'    <aside class="related">\n      <h2>Related reading</h2>\n      <ul>\n{links}\n      </ul>\n    </aside>\n'
    byline = f'      <p class="byline">By {_esc(author)} | {date_text}</p>\n' if author else ""
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="{lang}">\n'
        "<head>\n"
        f"{meta}"
        f"  <title>{_esc(title)} - {_esc(site)}</title>\n"
        '  <meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '  <link rel="stylesheet" href="/static/site.css">\n'
        '  <script src="/static/menu.js" defer></script>\n'
        "</head>\n"
        "<body>\n"
        f'  <header class="site-header">\n    <a class="logo" href="/">{_esc(site)}</a>\n'
        f'    <nav class="main-nav">\n      <ul>\n{nav_items}\n      </ul>\n    </nav>\n  </header>\n'
        "  <main>\n    <article>\n"
        f"      <h1>{_esc(title)}</h1>\n"
        f"{byline}"
        f"{body}\n"
        "    </article>\n"
        f"{aside}"
        "  </main>\n"
        f'  <footer class="site-footer">\n    <p>{footer}</p>\n'
        '    <p><a href="/about/">About</a> | <a href="/contact/">Contact</a> | <a href="/privacy/">Privacy</a></p>\n'
        "  </footer>\n"
        "</body>\n"
        "</html>\n"
    )


def spam_html() -> str:
    links = "\n".join(
        f'    <li><a href="http://cheap-deals.example.net/{i}">{_esc(k)}</a></li>'
        for i, k in enumerate(SPAM_LINKS * 2)
    )
    lines = "\n".join(f"    <p>{_esc(s)}</p>" for s in SPAM_LINES)
    return (
        '<!DOCTYPE html>\n<html>\n<head>\n  <meta charset="utf-8">\n'
        "  <title>CHEAP WATCHES BUY CHEAP BEST PRICE CLICK HERE</title>\n"
        '  <meta name="keywords" content="cheap watches, buy cheap, best price, replica, discount, click here">\n'
        "</head>\n<body>\n"
        "  <h1>CHEAP WATCHES BEST PRICE</h1>\n"
        f'  <div class="content">\n{lines}\n  </div>\n'
        f'  <ul class="links">\n{links}\n  </ul>\n'
        "  <p>cheap watches | buy cheap | best price | click here</p>\n"
        "</body>\n</html>\n"
    )


def boilerplate_html() -> str:
    nav = ["Home", "News", "Sport", "Weather", "Shop", "Events", "Jobs", "Sign in", "Register", "Help"]
    nav_items = "\n".join(f'      <li><a href="/{n.lower().replace(" ", "-")}/">{n}</a></li>' for n in nav)
    foot_cols = []
    for heading, items in [
        ("Company", ["About us", "Careers", "Press", "Advertise"]),
        ("Support", ["Help centre", "Contact", "Accessibility", "Status"]),
        ("Legal", ["Terms of use", "Privacy policy", "Cookie settings", "Imprint"]),
        ("Follow", ["Newsletter", "RSS", "Podcasts", "Apps"]),
    ]:
        lis = "\n".join(f'        <li><a href="/{i.lower().replace(" ", "-")}/">{i}</a></li>' for i in items)
        foot_cols.append(
            f'    <div class="col">\n      <h4>{heading}</h4>\n      <ul>\n{lis}\n      </ul>\n    </div>'
        )
    cols = "\n".join(foot_cols)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n  <meta charset="utf-8">\n'
        "  <title>Home - Riverside Portal</title>\n</head>\n<body>\n"
        '  <div class="cookie-banner"><p>This site uses cookies. <a href="/cookies/">Accept</a> '
        '<a href="/cookies/settings/">Settings</a></p></div>\n'
        f"  <header>\n    <nav>\n      <ul>\n{nav_items}\n      </ul>\n    </nav>\n"
        '    <form action="/search"><input type="text" name="q" placeholder="Search"><button>Go</button></form>\n'
        "  </header>\n"
        '  <main>\n    <div class="hero"><h2>Welcome</h2><p>Sign in to continue.</p></div>\n'
        '    <div class="tiles"><a href="/news/">Latest</a> <a href="/sport/">Scores</a> '
        '<a href="/weather/">Forecast</a> <a href="/shop/">Deals</a></div>\n  </main>\n'
        f"  <footer>\n{cols}\n    <p>&copy; 2024 Riverside Portal. All rights reserved.</p>\n  </footer>\n"
        "</body>\n</html>\n"
    )


def not_found_html() -> str:
    return (
        '<!DOCTYPE html>\n<html>\n<head><meta charset="utf-8"><title>404 Not Found</title></head>\n'
        "<body>\n  <h1>Not Found</h1>\n  <p>The requested URL was not found on this server.</p>\n"
        "  <hr>\n  <address>example-httpd Server at www.hearthandloaf.example Port 443</address>\n</body>\n</html>\n"
    )


def tiny_png() -> bytes:
    """A valid 1x1 grey PNG, built byte by byte (deterministic)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00\x80", 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# ---------------------------------------------------------------------------
# Page list: (key, url, status line, content type, body bytes, intended label)
# ---------------------------------------------------------------------------

EN_NAV = ["Home", "Articles", "Topics", "About"]
RELATED = ["Sourdough starters", "Coastal walks", "Garden projects"]


def build_pages() -> list[dict]:
    pages: list[dict] = []

    def add(key, url, body: bytes, content_type: str, status: str = "200 OK", kind: str = ""):
        pages.append(
            {
                "key": key,
                "url": url,
                "status": status,
                "content_type": content_type,
                "body": body,
                "kind": kind,
            }
        )

    sites = {
        "bread": ("Hearth and Loaf", "https://www.hearthandloaf.example/articles/how-bread-rises/"),
        "lighthouses": ("Coastline Notes", "https://coastlinenotes.example.org/history/lighthouses/"),
        "tidepools": ("Coastline Notes", "https://coastlinenotes.example.org/nature/tide-pools/"),
        "gears": ("Spoke and Chain", "https://spokeandchain.example.com/guides/how-gears-work"),
        "compost": ("Green Patch Journal", "https://greenpatch.example.org/2024/03/composting-at-home/"),
        "watercycle": ("Open Science Primer", "https://primer.example.edu/earth/water-cycle.html"),
        "catalogue": ("Shelf Life", "https://shelflife.example.net/posts/how-libraries-catalogue-books"),
        "bees": ("Green Patch Journal", "https://greenpatch.example.org/2024/02/keeping-bees/"),
        "sundials": ("Open Science Primer", "https://primer.example.edu/astronomy/sundials.html"),
    }
    for key, (site, url) in sites.items():
        a = ARTICLES[key]
        doc = article_html(
            site=site,
            title=a["title"],
            author=a["author"],
            paragraphs=a["paragraphs"],
            nav=EN_NAV,
            footer=f"&copy; 2024 {_esc(site)}. All rights reserved.",
            related=RELATED,
        )
        add(key, url, doc.encode("utf-8"), "text/html; charset=utf-8", kind="good_en")

    # Exact duplicate of the compost article on an aggregator, different chrome.
    a = ARTICLES["compost"]
    doc = article_html(
        site="Daily Garden Digest",
        title=a["title"],
        author=a["author"],
        paragraphs=a["paragraphs"],
        nav=["Front page", "Gardening", "Recipes", "Subscribe", "Log in"],
        footer="Republished with permission. Digest &copy; 2024.",
        date_text="11 March 2024",
    )
    add(
        "compost_exact_dup",
        "https://gardendigest.example.com/reposts/composting-beginners-guide",
        doc.encode("utf-8"),
        "text/html; charset=utf-8",
        kind="exact_dup_of:compost",
    )

    # Near duplicate of the lighthouse article.
    a = ARTICLES["lighthouses"]
    doc = article_html(
        site="Harbour Heritage",
        title=a["title"],
        author=a["author"],
        paragraphs=NEAR_DUP_LIGHTHOUSES,
        nav=["Home", "Heritage", "Visit", "Shop"],
        footer="&copy; 2024 Harbour Heritage Trust.",
        related=["Harbour walls", "Old ferries"],
    )
    add(
        "lighthouses_near_dup",
        "https://harbourheritage.example.org/stories/lighthouse-history",
        doc.encode("utf-8"),
        "text/html; charset=utf-8",
        kind="near_dup_of:lighthouses",
    )

    # Chinese, UTF-8.
    zh_nav = ["首页", "文化", "生活", "关于我们"]
    for key, d, url in [
        ("zh_tea", ZH_TEA, "https://www.chaxiang.example.cn/wenhua/cha-de-gushi.html"),
        ("zh_solar_terms", ZH_SOLAR_TERMS, "https://jieqi.example.cn/articles/24-jieqi"),
    ]:
        doc = article_html(
            site="文化随笔",
            title=d["title"],
            author="林晓",
            paragraphs=d["paragraphs"],
            nav=zh_nav,
            footer="&copy; 2024 文化随笔 版权所有",
            lang="zh-CN",
            date_text="2024年3月4日",
        )
        add(key, url, doc.encode("utf-8"), "text/html; charset=utf-8", kind="good_zh")

    # Chinese, GB2312 (declared in the HTTP header and in a meta tag).
    doc = article_html(
        site="山居笔记",
        title=ZH_BAMBOO_GB["title"],
        author="周平",
        paragraphs=ZH_BAMBOO_GB["paragraphs"],
        nav=zh_nav,
        footer="&copy; 2024 山居笔记",
        lang="zh-CN",
        charset="gb2312",
        date_text="2024年3月4日",
    )
    add(
        "zh_bamboo_gb2312",
        "http://www.shanju.example.cn/zhuzi.htm",
        doc.encode("gb2312"),
        "text/html; charset=gb2312",
        kind="good_zh_gb2312",
    )

    # German and French.
    doc = article_html(
        site="Gartenwelt",
        title=DE_HEDGEHOG["title"],
        author="Jana Reuter",
        paragraphs=DE_HEDGEHOG["paragraphs"],
        nav=["Start", "Garten", "Tiere", "Kontakt"],
        footer="&copy; 2024 Gartenwelt. Alle Rechte vorbehalten.",
        lang="de",
        date_text="4. März 2024",
    )
    add(
        "de_hedgehog",
        "https://gartenwelt.example.de/tiere/igel-im-garten",
        doc.encode("utf-8"),
        "text/html; charset=utf-8",
        kind="good_de",
    )
    doc = article_html(
        site="Patrimoine rural",
        title=FR_WINDMILLS["title"],
        author="Luc Moreau",
        paragraphs=FR_WINDMILLS["paragraphs"],
        nav=["Accueil", "Patrimoine", "Balades", "Contact"],
        footer="&copy; 2024 Patrimoine rural. Tous droits réservés.",
        lang="fr",
        date_text="4 mars 2024",
    )
    add(
        "fr_windmills",
        "https://patrimoine-rural.example.fr/moulins-a-vent",
        doc.encode("utf-8"),
        "text/html; charset=utf-8",
        kind="good_fr",
    )

    # Latin-1 bytes, no charset in the HTTP header or in the HTML.
    doc = article_html(
        site="Slow Travel Letters",
        title=LATIN1_COFFEE["title"],
        author="Hanna Lowe",
        paragraphs=LATIN1_COFFEE["paragraphs"],
        nav=EN_NAV,
        footer="&copy; 2024 Slow Travel Letters.",
        charset=None,
    )
    body = doc.encode("latin-1")
    add(
        "latin1_no_charset",
        "http://slowtravel.example.net/letters/coffee-houses.html",
        body,
        "text/html",
        kind="latin1_undeclared",
    )

    # Low quality.
    add(
        "spam_linkfarm",
        "http://cheap-deals.example.net/watches/best-price.html",
        spam_html().encode("utf-8"),
        "text/html; charset=utf-8",
        kind="spam",
    )
    add(
        "boilerplate_only",
        "https://www.riverside-portal.example.com/",
        boilerplate_html().encode("utf-8"),
        "text/html; charset=utf-8",
        kind="boilerplate",
    )

    # Non-200 and non-HTML.
    add(
        "http_404",
        "https://www.hearthandloaf.example/articles/old-recipe-archive/",
        not_found_html().encode("utf-8"),
        "text/html; charset=utf-8",
        status="404 Not Found",
        kind="http_404",
    )
    add(
        "image_png",
        "https://www.hearthandloaf.example/static/img/loaf.png",
        tiny_png(),
        "image/png",
        kind="image",
    )
    return pages


# ---------------------------------------------------------------------------
# Writers.
# ---------------------------------------------------------------------------


def _rid(n: int) -> str:
    return f"<urn:uuid:00000000-0000-0000-0000-{n:012d}>"


def _date(n: int) -> str:
    return f"{CRAWL_DAY}T10:{n // 60:02d}:{n % 60:02d}Z"


def write_warc(path: Path, pages: list[dict]) -> None:
    buf = io.BytesIO()
    writer = WARCWriter(buf, gzip=True, warc_version="1.0")

    info = (
        b"software: ultraclean-sample-generator/1.0 (warcio)\r\n"
        b"format: WARC File Format 1.0\r\n"
        b"description: Small synthetic sample crawl for the UltraClean pipeline. "
        b"All page text is original and written for this project.\r\n"
        b"license: Apache-2.0\r\n"
        b"isPartOf: ultraclean-sample\r\n"
        b"robots: classic\r\n"
    )
    n = 1
    rec = writer.create_warc_record(
        "",
        "warcinfo",
        payload=io.BytesIO(info),
        length=len(info),
        warc_content_type="application/warc-fields",
        warc_headers_dict={"WARC-Record-ID": _rid(n), "WARC-Date": _date(0), "WARC-Filename": WARC_NAME},
    )
    writer.write_record(rec)
    warcinfo_id = _rid(n)

    for i, p in enumerate(pages, start=1):
        url = p["url"]
        host = url.split("/")[2]
        path_q = "/" + url.split("/", 3)[3] if url.count("/") >= 3 else "/"
        date = _date(i)
        req_id, resp_id = _rid(n + 1), _rid(n + 2)
        n += 2

        req_headers = StatusAndHeaders(
            f"GET {path_q} HTTP/1.1",
            [
                ("Host", host),
                ("User-Agent", "UltraCleanSampleBot/1.0 (+https://example.org/ultraclean-bot)"),
                ("Accept", "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
                ("Accept-Language", "en-US,en;q=0.5"),
                ("Accept-Encoding", "identity"),
                ("Connection", "close"),
            ],
            is_http_request=True,
        )
        req = writer.create_warc_record(
            url,
            "request",
            http_headers=req_headers,
            warc_headers_dict={
                "WARC-Record-ID": req_id,
                "WARC-Date": date,
                "WARC-Warcinfo-ID": warcinfo_id,
                "WARC-Concurrent-To": resp_id,
            },
        )

        body: bytes = p["body"]
        resp_headers = StatusAndHeaders(
            p["status"],
            [
                ("Date", "Mon, 04 Mar 2024 10:00:00 GMT"),
                ("Server", "example-httpd/2.4"),
                ("Content-Type", p["content_type"]),
                ("Content-Length", str(len(body))),
                ("Connection", "close"),
            ],
            protocol="HTTP/1.1",
        )
        resp = writer.create_warc_record(
            url,
            "response",
            payload=io.BytesIO(body),
            length=len(body),
            http_headers=resp_headers,
            warc_headers_dict={
                "WARC-Record-ID": resp_id,
                "WARC-Date": date,
                "WARC-Warcinfo-ID": warcinfo_id,
                "WARC-IP-Address": f"192.0.2.{i}",
            },
        )
        writer.write_record(req)
        writer.write_record(resp)

    path.write_bytes(buf.getvalue())


def jsonl_docs() -> list[dict]:
    def plain(key):
        return "\n".join(ARTICLES[key]["paragraphs"])

    docs = [
        ("sample-0001", plain("bread"), "https://www.hearthandloaf.example/articles/how-bread-rises/"),
        ("sample-0002", plain("tidepools"), "https://coastlinenotes.example.org/nature/tide-pools/"),
        (
            "sample-0003",
            plain("catalogue"),
            "https://shelflife.example.net/posts/how-libraries-catalogue-books",
        ),
    ]
    for j, (url, text) in enumerate(JSONL_NEW_GOOD, start=4):
        docs.append((f"sample-{j:04d}", text, url))
    # Near duplicate of the gears article (two words changed, one sentence added).
    gears = list(ARTICLES["gears"]["paragraphs"])
    gears[0] = gears[0].replace("the relief of", "the joy of")
    gears[2] = gears[2].replace("good for speed", "great for speed")
    gears.append("A quick check of the chain before each ride will also save you trouble later.")
    docs.append(("sample-0008", "\n".join(gears), "https://pedalforum.example.com/threads/gears-explained"))
    docs.append(("sample-0009", "", "https://empty.example.com/blank"))
    docs.append(("sample-0010", JSONL_SPAM, "http://cheap-deals.example.net/pills"))
    # Exact duplicate of sample-0001 under another URL.
    docs.append(("sample-0011", plain("bread"), "https://mirror.example.org/bread-rising"))
    docs.append(
        (
            "sample-0012",
            "Home | News | Contact\nSign in\nSubscribe\n© 2024",
            "https://www.riverside-portal.example.com/mobile",
        )
    )
    return [
        {"id": i, "text": t, "url": u, "date": f"{CRAWL_DAY}T1{k % 10}:00:00Z"}
        for k, (i, t, u) in enumerate(docs)
    ]


def write_jsonl(path: Path) -> None:
    raw = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
        for d in jsonl_docs():
            gz.write((json.dumps(d, ensure_ascii=False, sort_keys=False) + "\n").encode("utf-8"))
    path.write_bytes(raw.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=HERE)
    args = ap.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    pages = build_pages()
    write_warc(args.out_dir / WARC_NAME, pages)
    write_jsonl(args.out_dir / JSONL_NAME)
    for name in (WARC_NAME, JSONL_NAME):
        p = args.out_dir / name
        print(f"wrote {p} ({p.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
