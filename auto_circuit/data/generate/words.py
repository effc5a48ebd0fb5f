"""Word lists for the text datasets.

Every word here is a single GPT-2 token when preceded by a space (``" Mary"``), and the
docstring words also without the space. No GPT-2 tokenizer is available where these
datasets are generated and tested, so this is a property of the lists, not checked at
run time; it was checked once against GPT-2's BPE vocabulary. The tests check prompt
lengths with an offline word-level tokenizer instead.
"""

from __future__ import annotations

NAMES: tuple[str, ...] = tuple(
    """
    Aaron Adam Alan Alex Alice Amy Andrew Andy Anna Anthony Arthur Austin Blake Brandon
    Brian Carter Charles Charlie Christian Clark Cole Connor Daniel David Dean Edward
    Emily Eric Eva Frank George Grant Henry Ian Jack Jacob Jake James Jane Jason Jay
    Jennifer Jeremy Jessica John Jonathan Jordan Joseph Joshua Justin Kate Kelly Kevin
    Kyle Laura Leon Lewis Lisa Louis Luke Marco Marcus Maria Mark Martin Mary Matthew Max
    Michael Michelle Morgan Patrick Paul Peter Rachel Richard Robert Roman Rose Ruby
    Russell Ryan Sarah Scott Sean Simon Stephen Steven Taylor Thomas Tyler Victoria Warren
    William
    """.split()
)
"""First names (from the kind of list Wang et al. 2022 used for IOI)."""

PLACES: tuple[str, ...] = (
    "store",
    "garden",
    "restaurant",
    "school",
    "hospital",
    "office",
    "house",
    "station",
)
"""IOI places (Wang et al. 2022)."""

OBJECTS: tuple[str, ...] = (
    "ring",
    "kiss",
    "bone",
    "basketball",
    "computer",
    "necklace",
    "drink",
    "snack",
)
"""IOI objects (Wang et al. 2022); all take the article "a"."""

EVENT_NOUNS: tuple[str, ...] = tuple(
    """
    war trial strike siege journey campaign project reign tour voyage program dispute
    marriage contract study deal conflict investigation occupation crisis drought famine
    plague rebellion revolution expedition friendship partnership alliance treaty affair
    relationship struggle effort process operation experiment tradition dynasty empire
    """.split()
)
"""Nouns of things that last a while, for the Greater-Than prompts."""

VARIABLE_NAMES: tuple[str, ...] = tuple(
    """
    data name file value test result line user key request path output node item url
    model response text version function log string field start number values index
    error context image message check size event state row parser end files form query
    fields instance label action target array code num table source config options update
    module status group content client filename results command base format color
    settings order count match tag title parent session token server host date
    description mode project info page header option task shape load names port root
    """.split()
)
"""Common Python parameter names, for the docstring prompts."""

DESCRIPTION_WORDS: tuple[str, ...] = tuple(
    """
    price control cost issue process position course type subject age force matter
    health street class mind condition paper bank section activity building
    sense staff team student language town plan product practice evidence ground letter
    game food union role land art support range stage trade voice club history account
    material care manager record example training window air light quality rule story tax
    worker nature method unit detail wall amount president chapter property director
    leader board king production share picture security election future site loss shop
    animal heart purpose standard doctor factor music charge pattern design piece
    population tree knowledge performance plant pressure fire environment analysis
    success region list set space statement demand step capital choice player station
    film feature income cup technology machine cell degree energy growth treatment risk
    sound resource floor science style hall horse character answer dog brother argument
    season bill element glass duty claim fund park note sun box river profit division
    stone post help oil sector attack direction seat goal sign ability campaign fish
    medium show drug library press surface blood culture memory return bar talk access
    deal star cause payment reference article chair earth object agency card collection
    public document weight bird rock call edge quarter stock concept network radio forest
    race ball crime peace review scale scene speech band hill reader owner trust truth
    turn trial balance copy league length wind front move pain spirit train contact
    official strength cash gas agent pair protection rise driver master meaning vote play
    route speed credit impact danger flower half track video bag comment distance gold
    link skin boat prison sight wine offer writer hole package phone sample ship threat
    volume author background engine entry yard bus song category football meal wood
    bridge sheet flight limit plate rain respect dream selection spring mark notice
    address bottom kid middle neck run store transfer wave channel component cut fee lead
    weather block brain guide program screen connection cover map metal phase pool search
    sequence sky sum trip cat display gate heat location reading theme drive tool flow
    lane motion release total wing border pocket ring device fruit lake leaf square tone
    walk chain circle fall shot mass panel fan iron origin ticket bone chief editor fuel
    height round vision warning column gap grass plane score shadow shock touch topic
    break camp phrase coat mill stress boot depth frame holder ice inch wheel cycle export
    hat setting travel camera focus green guard input layer sleep suit bread cake peak
    self angle bay bid cloud custom dollar variable zone actor chip core final gain rent
    reply secret shirt apple pipe disk fight hero journal mail pace platform print rank
    sand scope shift stream clock delay mission pack seed tail tie watch dark hold net tip
    operator shell storage summary tube drop import proof win wire bell complex draft
    grade lift mouse movie profile belt black joy local red register storm album bench
    button cap chart coin dust pole stand stick
    """.split()
)
"""Common nouns for the docstring descriptions (no overlap with ``VARIABLE_NAMES``)."""
