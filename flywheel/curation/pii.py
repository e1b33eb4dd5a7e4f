"""Layered PII scrubber: find personal data in text and replace it with typed placeholders.

Layers, cheapest first; each runs only when a one-character check says it can match:

1. candidates from compiled regexes (`@` gates e-mail and URL credentials, a digit gates the
   numeric types, a `:x:` run gates IPv6, capitalised words feed the name layer);
2. validators on candidates only: Luhn for cards, ISO 13616 mod-97 plus the country's registered
   length for IBANs, SSA area/group/serial rules for US SSNs, `ipaddress` for IPv4/IPv6, the
   `phonenumbers` numbering plans of many regions for phone numbers;
3. person names from an offline gazetteer of common given names and surnames (typed in below, no
   downloads), surname endings and context cues (`my name is`, `Mr.`, `Dear`, `Name:`, `… said`);
4. overlap resolution by type priority (a Luhn-valid card is not also a phone number).

Spans are `(type, start, end)` in Python `str` indices (code points) into the ORIGINAL text; the
values themselves are never recorded. `scrub_table` is the batch API over a `pyarrow` table of
documents; `find_residual_pii` is the cheap post-scrub check of the data-quality gate.

    from flywheel.curation.pii import scrub, scrub_table, find_residual_pii
    scrub("mail me at jane.doe@example.org").text   # 'mail me at <EMAIL>'

docs/pii.md has the measured recall/precision and the speed against presidio-analyzer
(`benchmarks/bench_pii.py`).
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from bisect import bisect_right
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import pyarrow as pa

EMAIL = "EMAIL"
PHONE = "PHONE"
CREDIT_CARD = "CREDIT_CARD"
IBAN = "IBAN"
US_SSN = "US_SSN"
IP_ADDRESS = "IP_ADDRESS"
URL_CREDENTIALS = "URL_CREDENTIALS"
PERSON = "PERSON"

# Order is the overlap priority: when two candidates overlap, the earlier type wins (the userinfo
# of a URL is not also an e-mail; a Luhn-valid 16-digit card is not also a phone number).
PII_TYPES: tuple[str, ...] = (URL_CREDENTIALS, EMAIL, IBAN, CREDIT_CARD, US_SSN, IP_ADDRESS, PHONE, PERSON)
STRUCTURED_TYPES: tuple[str, ...] = PII_TYPES[:-1]
_PRIORITY = {t: i for i, t in enumerate(PII_TYPES)}

SPAN_TYPE = pa.struct([("type", pa.string()), ("start", pa.int32()), ("end", pa.int32())])
SPANS_TYPE = pa.list_(SPAN_TYPE)

# Numbering plans that validate phone numbers written without a country code; numbers written
# with `+` or `00` carry their own country code and are validated against it.
DEFAULT_PHONE_REGIONS: tuple[str, ...] = (
    "US", "GB", "DE", "FR", "IN", "IT", "ES", "NL", "BE", "CH", "AT", "SE", "NO", "DK", "FI",
    "PL", "PT", "IE", "AU", "BR", "HU", "CZ", "JP", "ZA", "MX",
)  # fmt: skip
# An unformatted digit run is valid in some region of a long list by chance (9 in 10 random
# 7–11 digit strings are): it needs a phone cue, and is then checked against these plans only.
_BARE_PHONE_REGIONS = ("US", "GB", "DE", "FR")


class PiiSpan(NamedTuple):
    """One detected item: its type and `[start, end)` offsets into the original text."""

    type: str
    start: int
    end: int


@dataclass(frozen=True)
class ScrubResult:
    """A scrubbed document: the text with placeholders and where the PII was in the original."""

    text: str
    spans: tuple[PiiSpan, ...]

    @property
    def counts(self) -> Counter[str]:
        return Counter(s.type for s in self.spans)


# ---------------------------------------------------------------------------------------------
# Structured types: candidate regexes and validators
# ---------------------------------------------------------------------------------------------


def _words(block: str) -> list[str]:
    """The whitespace-separated words of a typed-in list."""
    return block.split()


_HAS_DIGIT = re.compile(r"\d")
_NON_DIGIT = re.compile(r"\D+")
# A number continued by another on the same line: a row of a table or listing, not an identifier.
_NUMBER_ROW = re.compile(r"[ \t]\d")
_NUMBER_ROW_BEFORE = re.compile(r"\d[ \t]$")

_EMAIL_RE = re.compile(
    r"(?<![\w.+%-])"
    r"[\w+%-]+(?:\.[\w+%-]+)*"  # local part: no leading, trailing or doubled dots
    r"@(?:[^\W_](?:[\w-]{0,61}[^\W_])?\.)+[^\W\d_]{2,24}"
    r"(?![\w-])"
)
# The local part ending at an "@": e-mails are found from their "@" (rare) instead of trying the
# pattern at every word character.
_EMAIL_LOCAL_TAIL = re.compile(r"[\w.+%-]{1,64}$")

# `scheme://user:password@host`: the userinfo is the secret; scheme and host stay readable.
_URL_CREDENTIALS_RE = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]{1,15}://([^\s/?#@:\"'<>]+:[^\s/?#@\"'<>]+)@[\w.-]")

# Every numeric pattern opens with a bare `\d` and checks what precedes it in a lookbehind after
# it: a leading lookbehind would stop `re` from skipping to the next digit in C (5× slower).
# 12–19 digits as one run, in groups of four, or Amex/Diners 4-6-5 / 4-6-4.
_CARD_RE = re.compile(
    r"\d(?<![\w+/.-]\d)(?:"
    r"\d{11,18}"
    r"|\d{3}(?P<a>[ -])\d{4}(?P=a)\d{4}(?P=a)\d{1,4}(?:(?P=a)\d{1,3})?"
    r"|\d{3}(?P<b>[ -])\d{6}(?P=b)\d{4,5}"
    r")(?![\w-]|[.,]\d)"
)

_SSN_RE = re.compile(r"(\d(?<![\w+-]\d)\d\d)([- .]?)(\d{2})\2(\d{4})(?![\w-]|[.,]\d)")
_SSN_CONTEXT = re.compile(r"(?i)\bss[ #:n]|social[ -]security|\bsocial\b|tax ?id|taxpayer")

# Matched from the check digits; the two-letter country code is in the lookbehind (start - 2).
_IBAN_RE = re.compile(r"\d(?<=(?<!\w)[A-Za-z]{2}\d)\d(?: ?[A-Za-z0-9]){11,34}(?!\w)")
# ISO 13616 registered lengths (SWIFT IBAN registry) by country.
_IBAN_LENGTHS: dict[str, int] = {
    p[:2]: int(p[3:])
    for p in _words(
        """
        AD:24 AE:23 AL:28 AT:20 AZ:28 BA:20 BE:16 BG:22 BH:22 BI:27 BR:29 BY:28 CH:21 CR:22
        CY:28 CZ:24 DE:22 DJ:27 DK:18 DO:28 EE:20 EG:29 ES:24 FI:18 FK:18 FO:18 FR:27 GB:22
        GE:22 GI:23 GL:18 GR:27 GT:28 HN:28 HR:21 HU:28 IE:22 IL:23 IQ:23 IS:26 IT:27 JO:30
        KW:30 KZ:20 LB:28 LC:32 LI:21 LT:20 LU:20 LV:21 LY:25 MC:27 MD:24 ME:22 MK:19 MN:20
        MR:27 MT:31 MU:30 NI:28 NL:18 NO:15 OM:23 PK:24 PL:28 PS:29 PT:25 QA:29 RO:24 RS:22
        RU:33 SA:24 SC:31 SD:18 SE:24 SI:19 SK:24 SM:27 SO:23 ST:25 SV:28 TL:23 TN:24 TR:26
        UA:29 VA:22 VG:24 XK:20 YE:30
        """
    )
}

_IPV4_RE = re.compile(r"\d(?<![\w.]\d)\d{0,2}\.(?:\d{1,3}\.){2}\d{1,3}(?!\w|\.\d)")
_IPV6_RE = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{0,4})(?:%\w+)?(?![\w:])"
)
_HEX_GROUP = re.compile(r"[0-9A-Fa-f]+")
_IPV6_HINT = re.compile(r":[0-9A-Fa-f]{0,4}:")

# Phone numbers: an optional `+`, digit groups joined by one space, dot, dash or bracket, an
# optional extension. Newlines never join groups (the lines of an address are separate numbers).
# (A `+` or `(` right before the first digit is taken in by the code, not the pattern.)
_PHONE_RE = re.compile(
    r"\d(?<![\w/:.)-]\d)[\d ().-]{5,22}\d"
    r"(?: ?(?:x|ext\.?|extension) ?\d{1,6})?"
    r"(?!\w|[-.:,/]\d)"
)
_EXTENSION = re.compile(r" ?(?:x|ext\.?|extension) ?\d{1,6}$")
_PAREN_GROUP = re.compile(r"\(\d{1,5}\)")
_PHONE_SEP = re.compile(r"[ .-]")
_GROUP_SPLIT = re.compile(r"[ .()-]+")
# A calendar date or a year among the groups: a date range or a citation, not a phone.
_DATE_IN = re.compile(
    r"(?<!\d)(?:(?:19|20)\d\d[-./](?:0?[1-9]|1[0-2])[-./](?:0?[1-9]|[12]\d|3[01])"
    r"|(?:0?[1-9]|[12]\d|3[01])[-./](?:0?[1-9]|1[0-2])[-./](?:1[5-9]|20)?\d\d"
    r"|(?:0?[1-9]|1[0-2])[-./](?:0?[1-9]|[12]\d|3[01])[-./](?:1[5-9]|20)\d\d)(?!\d)"
    r"|^(?:1[5-9]|20)\d\d[-./](?:0?[1-9]|1[0-2])[-./]"
)
_YEAR = re.compile(r"(?:1[5-9]|20)\d\d")
_PHONE_CONTEXT = re.compile(
    r"(?i)\b(?:phone|telephone|tel|telefon|telefono|téléphone|mobile|mob|cell|cellphone|fax|call|"
    r"called|calling|contact|whatsapp|sms|text|office|desk|dial|hotline|helpline|ph|reach|ring|home|"
    r"work|message|messages|answering|tél|handy)\b"
)
# Identifiers written like phone or card numbers.
_ID_CONTEXT = re.compile(
    r"(?i)\b(?:isbn|issn|doi|pmid|lccn|oclc|arxiv|ean|upc|sku|serial|order|invoice|tracking|bar ?code)\b"
)


def luhn_ok(digits: str) -> bool:
    """True if the digit string passes the Luhn (mod 10) check used by payment cards."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i & 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def card_ok(digits: str) -> bool:
    """A payment card number: 12–19 digits, an issuer-like first digit, Luhn-valid, not one digit repeated."""
    return (
        12 <= len(digits) <= 19
        # No card network issues from 7/8/9 (and ISBN-13s start with 978/979).
        and digits[0] not in "789"
        and digits.count(digits[0]) != len(digits)
        and luhn_ok(digits)
    )


def iban_ok(compact: str) -> bool:
    """ISO 13616: the country's registered length, and the rearranged number mod 97 is 1."""
    s = compact.upper()
    if _IBAN_LENGTHS.get(s[:2]) != len(s) or not s[2:4].isdigit() or not (s.isascii() and s.isalnum()):
        return False
    return int("".join(str(int(c, 36)) for c in s[4:] + s[:4])) % 97 == 1


def ssn_ok(area: str, group: str, serial: str) -> bool:
    """US SSN structure: area not 000, 666 or 9xx; group not 00; serial not 0000."""
    return area != "000" and area != "666" and area[0] != "9" and group != "00" and serial != "0000"


def ip_ok(candidate: str) -> bool:
    """A valid IPv4 (no leading zeros) or IPv6 address (zone id allowed), per `ipaddress`."""
    try:
        ipaddress.ip_address(candidate.split("%", 1)[0])
    except ValueError:
        return False
    return True


@lru_cache(maxsize=64)
def _region_plan(regions: tuple[str, ...]) -> tuple[tuple[str, int, str], ...]:
    from phonenumbers import PhoneMetadata

    plan = []
    for r in regions:
        md = PhoneMetadata.metadata_for_region(r)
        if md is None:
            raise ValueError(f"unknown phone region {r!r}: give an ISO 3166 code that phonenumbers knows")
        plan.append((r, md.country_code, md.national_prefix or ""))
    return tuple(plan)


def _phone_national(digits: str, plan: Iterable[tuple[str, int, str]], want_possible: bool) -> tuple[bool, bool]:
    """(valid in some region, possible in some region) for a number written without country code.

    Builds the PhoneNumber directly (trunk prefix stripped) instead of `phonenumbers.parse` per
    region: the same metadata check, about 7× cheaper.
    """
    import phonenumbers

    possible = False
    for region, cc, trunk in plan:
        d = digits[len(trunk) :] if trunk and digits.startswith(trunk) else digits
        if len(d) < 4:
            continue
        num = phonenumbers.PhoneNumber(country_code=cc, national_number=int(d))
        zeros = len(d) - len(d.lstrip("0"))
        if zeros:
            num.italian_leading_zero = True
            num.number_of_leading_zeros = zeros
        if phonenumbers.is_valid_number_for_region(num, region):
            return True, True
        if want_possible and not possible and phonenumbers.is_possible_number(num):
            possible = True
    return False, possible


def _phone_international(candidate: str) -> tuple[bool, bool]:
    import phonenumbers

    try:
        num = phonenumbers.parse(candidate, None)
    except phonenumbers.NumberParseException:
        return False, False
    if phonenumbers.is_valid_number(num):
        return True, True
    return False, phonenumbers.is_possible_number(num)


# ---------------------------------------------------------------------------------------------
# Person names: gazetteer, surname endings and context cues
# ---------------------------------------------------------------------------------------------

# Common given names across the languages of European, American, South Asian and East Asian web
# text, typed in from general knowledge (US census top names, national name statistics); no list
# was copied from a data set. Matching is case-insensitive after folding diacritics.
_FIRST_NAMES = """
james john robert michael william david richard charles joseph thomas christopher daniel paul
donald george kenneth steven edward brian ronald anthony kevin jason matthew gary timothy jose
larry jeffrey scott eric stephen andrew raymond gregory joshua jerry dennis walter patrick peter
harold douglas henry carl arthur ryan roger juan albert jonathan justin gerald keith samuel
ralph lawrence nicholas benjamin bruce brandon adam harry fred wayne billy steve louis jeremy
aaron randy howard eugene carlos russell bobby victor martin ernest phillip todd jesse craig alan
shawn clarence sean philip chris johnny earl jimmy antonio danny bryan tony luis mike stanley
leonard nathan dale manuel rodney curtis norman allen marvin vincent glenn travis jeff chad jacob
melvin alfred kyle francis bradley jesus herbert frederick joel edwin eddie ricky troy randall
barry alexander bernard mario leroy francisco marcus theodore clifford miguel oscar jim tom
calvin alex jon ronnie lloyd tommy leon derek warren darrell jerome floyd leo alvin tim wesley
gordon dean greg jorge dustin pedro derrick dan lewis zachary corey herman maurice vernon roberto
clyde hector shane ricardo sam rick lester brent ramon charlie tyler gilbert gene marc reginald
ruben brett nathaniel rafael edgar milton raul ben chester cecil duane franklin andre elmer brad
gabriel ron mitchell roland arnold harvey jared adrian karl cory claude erik darryl neil christian
javier fernando clinton ted mathew tyrone darren lonnie lance cody julio kurt allan nelson clayton
hugh dwayne dwight armando felix everett ian wallace ken bob jaime alfredo alberto dave ivan
byron julian isaac morris willard ross andy marshall salvador kirk sergio seth kent eduardo
enrique freddie ethan noah liam mason logan lucas oliver elijah aiden jackson sebastian owen
luke isaiah caleb connor hunter evan nolan dylan gavin cameron colton jayden wyatt levi carter
mary patricia linda barbara elizabeth jennifer maria susan margaret dorothy lisa nancy karen
betty helen sandra donna carol ruth sharon michelle laura sarah kimberly deborah jessica shirley
cynthia angela melissa brenda amy anna rebecca kathleen pamela martha debra amanda stephanie
carolyn christine marie janet catherine frances ann joyce diane alice julie heather teresa doris
gloria evelyn jean cheryl mildred katherine joan ashley judith janice nicole judy christina kathy
theresa beverly denise tammy irene jane lori rachel marilyn andrea kathryn louise sara anne
jacqueline wanda bonnie julia lois tina phyllis norma paula diana annie lillian emily robin
peggy crystal gladys rita connie edna tiffany carmen rosa cindy wendy edith sherry sylvia
josephine thelma shannon sheila ethel ellen elaine marjorie carrie monica esther pauline emma
juanita anita rhonda hazel amber eva debbie clara lucille joanne eleanor valerie danielle megan
alicia suzanne michele gail bertha darlene veronica jill erin geraldine lauren cathy joann
lorraine sally regina erica beatrice dolores bernice audrey yvonne annette samantha marion dana
stacy ana renee ida vivian roberta holly brittany melanie loretta yolanda jeanette laurie katie
kristen vanessa alma elsie beth jeanne vicki carla tara rosemary eileen terri gertrude lucy tonya
ella stacey wilma gina kristin natalie agnes vera charlene bessie melinda colleen allison tamara
claudia jackie marcia tanya nellie marlene heidi glenda lydia viola courtney marian stella
caroline dora vickie mattie maxine irma mabel marsha myrtle lena christy deanna patsy hilda
gwendolyn jennie nora margie nina cassandra leah priscilla naomi carole olga dianne tracey leona
jenny felicia sonia miriam velma becky kristina toni misty shelly daisy ramona sherri erika
katrina claire charlotte madison olivia abigail chloe sophia isabella ava mia harper aubrey zoe hannah
natasha alexis kayla brianna jasmine morgan haley sydney taylor
hans klaus jurgen wolfgang dieter uwe stefan stephan andreas matthias mathias tobias jonas niklas florian
johannes moritz sabine ursula monika petra birgit susanne anja katrin lea sophie leonie anke
heike gisela ingrid helga greta frieda heinz gunter horst werner manfred ulrich rainer jorg
dirk holger torsten volker bernd axel lukas finn jannik annika svenja jana franziska
pierre michel philippe alain nicolas christophe laurent julien sebastien francois olivier thierry
antoine mathieu guillaume hugo theo baptiste camille manon ines juliette margaux mathilde elodie
celine isabelle nathalie sylvie sandrine aurelie emilie amelie brigitte monique francoise
genevieve dominique jacques rene yves gerard
pieter kees joost bram daan sem ruben thijs maarten sander willem hendrik anouk sanne femke lotte
marieke annelies wouter jeroen lieke geert bart koen
lars anders johan nils olof magnus mikael henrik oskar emil viktor gustav sven bjorn ole jens
soren mads rasmus kasper mikkel frederik karin elin linnea astrid maja freja sofie mette hanne
kirsten lise sigrid solveig liv ingeborg helena johanna aino matti mikko juha jukka timo kari
pekka antti ville jari heikki tuomas sanna paivi tiina riikka satu minna jaana eeva pirjo leena
aleksi eino gudrun sigurdur gunnar olafur einar hallgrimur kristjan
giuseppe giovanni luigi angelo vincenzo pietro salvatore carlo franco domenico bruno paolo
giorgio aldo luciano marco alessandro matteo lorenzo davide simone federico riccardo stefano
giulia chiara francesca federica martina valentina alessia silvia elena giorgia giovanna lucia
paola
javier alejandro pablo alvaro diego raul vicente andres joaquin santiago mateo josefa isabel
pilar cristina marta sofia camila daniela gabriela mariana fernanda beatriz raquel alba nuria
montserrat joao tiago rui nuno goncalo duarte afonso joana catarina leonor francisca matilde
thiago gustavo rodrigo felipe leonardo matheus vitoria larissa leticia juliana
piotr krzysztof andrzej tomasz pawel marcin michal jakub grzegorz lukasz mateusz kamil wojciech
marek stanislaw zbigniew agnieszka katarzyna malgorzata joanna magdalena zofia aleksandra
karolina dorota jolanta beata krystyna jiri petr josef jaroslav tomas miroslav zdenek lukas
hana lucie lenka katerina tereza dmitri dmitry sergei sergey alexei andrei vladimir nikolai
mikhail tatiana irina svetlana anastasia ekaterina yulia oksana natalya
laszlo istvan jozsef janos zoltan sandor gabor ferenc attila tamas zsolt balazs csaba levente
bence katalin erzsebet ilona zsuzsanna judit agnes krisztina eszter reka nora dora aniko
mohammed muhammad ahmed omar hassan hussein ibrahim yusuf mustafa khalid fatima aisha zainab
maryam layla amir reza mehmet ahmet emre elif zeynep ayse raj rahul amit sanjay vijay arjun
priya anjali pooja neha sunita deepak suresh ramesh hiroshi takashi kenji yuki haruto yuko
keiko akira satoshi kwame kofi chinedu ngozi oluwaseun thabo sipho
"""

# Common surnames (US census top names plus frequent European and Asian ones), typed in the same
# way. Surnames that are everyday English words (White, Young, King …) are left out: alone they are
# too often not a name; after a given name they are still caught (the run extends over them).
_SURNAMES = """
smith johnson williams jones miller davis garcia rodriguez wilson martinez anderson taylor
thomas hernandez moore martin thompson lopez gonzalez harris clark lewis robinson walker perez
allen sanchez wright scott adams nelson ramirez campbell mitchell roberts carter phillips evans
turner torres parker collins edwards stewart flores morris nguyen murphy rivera cook rogers
morgan peterson cooper reed bailey gomez kelly howard ward diaz richardson watson brooks bennett
james reyes cruz hughes myers foster sanders ross morales powell sullivan russell ortiz jenkins
gutierrez perry butler barnes fisher henderson coleman simmons patterson reynolds hamilton graham
kim gonzales alexander ramos wallace griffin cole hayes chavez gibson bryant ellis stevens murray
marshall owens mcdonald harrison ruiz kennedy wells alvarez mendoza castillo olson webb tucker
freeman burns vasquez snyder simpson crawford jimenez porter mason shaw gordon wagner hunter
romero hicks dixon palmer robertson holmes meyer boyd warren moreno schmidt patel ferguson
nichols herrera medina ryan fernandez weaver daniels stephens gardner payne kelley dunn pierce
arnold tran spencer peters hawkins hansen castro hoffman elliott cunningham knight bradley
carroll hudson duncan armstrong berry andrews johnston riley carpenter perkins aguilar silva
richards willis matthews chapman lawrence garza vargas watkins wheeler larson carlson harper
greene burke guzman morrison munoz jacobs obrien lawson franklin lynch bishop salazar mendez
gilbert jensen williamson montgomery harvey oliver howell hanson weber garrett sims burton fuller
soto mccoy welch chen schultz walters reid walsh fowler bowman davidson schneider newman brewer
lucas holland wong santos curtis pearson delgado valdez pena rios douglas sandoval barrett
hopkins keller guerrero stanley bates alvarado ortega estrada contreras barnett caldwell
lambert chambers nunez leonard lowe rhodes gregory shelton frazier becker maldonado fleming vega
sutton cohen jennings mcdaniel vaughn vazquez schwartz benson dominguez horton wolfe graves
haynes thornton mccarthy zimmerman erickson fletcher mckinney dawson marquez reeves klein
espinoza baldwin moran robbins higgins cortez griffith bowen cummings ramsey swanson acosta
chandler navarro fitzgerald doyle mclaughlin rojas rodgers stevenson singh yang figueroa harmon
goodman christensen goodwin mullins molina webster fischer campos avila sherman chang hodges
juarez gallagher duran hubbard miranda wang saunders hammond carrillo townsend ingram mejia
ayala schroeder hampton parsons strickland osborne maxwell chan harrington patton mueller
hartman buchanan mccormick clarke gibbs mcguire bauer norton hogan robles salinas mcbride solis
pham pratt trujillo shaffer aguirre pacheco cochran cervantes olsen ochoa cabrera velasquez
montoya roth meyers cardenas fuentes weiss hoover wilkins nicholson underwood petersen mckenzie
serrano wilcox calderon gallegos guerra whitaker davenport copeland roberson larsen pittman
wilkinson atkinson rosales phelps farrell castaneda dickerson trevino villarreal valencia
callahan hensley huffman hancock grimes delacruz camacho parrish melton brennan russo
hutchinson liu mcdowell humphrey koch suarez gilmore ibarra macias khan andrade stephenson
wilkerson blackwell mercado beasley zamora macdonald orozco jacobson huang mosley villanueva
mccullough santana valenzuela barrera berger escobar velez odonnell lozano bartlett melendez
rocha hendricks rangel ellison gillespie nielsen livingston leblanc bradshaw middleton schaefer
mcintosh pennington reilly hebert mcfarland fitzpatrick mahoney donovan mcconnell mayer zuniga
pineda mcmillan bautista dougherty
muller mueller schmidt schneider fischer meyer weber schulz wagner becker hoffmann koch richter
klein wolf schroder neumann schwarz zimmermann braun kruger hartmann lange schmitt werner krause
lehmann kohler herrmann walter konig huber kaiser fuchs peters jung moller vogel keller frank
bergmann
bernard dubois durand leroy moreau simon laurent lefebvre michel garcia david bertrand roux
vincent fournier morel girard andre lefevre mercier dupont lambert bonnet francois martinez
legrand garnier faure rousseau blanc guerin muller henry roussel nicolas perrin morin mathieu
clement gauthier dumont lopez fontaine chevalier robin masson sanchez
jansen janssen visser smit meijer mulder bos vos peeters maes jacobs mertens willems claes goossens
wouters dubois lambert dekker brouwer dijkstra bakker vermeulen hendriks
andersson johansson karlsson nilsson eriksson larsson olsson persson svensson gustafsson
pettersson jonsson jansson hansen johansen olsen pedersen nielsen jensen christensen rasmussen
sorensen jorgensen kristensen korhonen virtanen makinen nieminen makela hamalainen laine
heikkinen koskinen jarvinen lehtonen lehtinen saarinen salminen heinonen niemi kinnunen
johannesson jonsdottir sigurdsson gudmundsson
rossi russo ferrari esposito bianchi romano colombo ricci marino greco bruno gallo conti
deluca mancini costa giordano rizzo lombardi moretti barbieri fontana santoro mariani rinaldi
caruso ferrara galli martini leone longo gentile martinelli
fernandez gonzalez rodriguez sanchez perez martin gomez ruiz hernandez jimenez diaz moreno
alvarez romero alonso gutierrez navarro torres dominguez vazquez ramos gil serrano blanco
molina morales suarez ortega delgado castro ortiz rubio marin sanz iglesias nunez medina
garrido santos ferreira pereira oliveira costa rodrigues martins sousa fernandes goncalves
gomes lopes marques alves almeida ribeiro pinto carvalho teixeira moreira correia mendes
nowak kowalski wisniewski wojcik kowalczyk kaminski lewandowski zielinski szymanski wozniak
dabrowski kozlowski jankowski mazur kwiatkowski krawczyk piotrowski grabowski nowakowski
pawlowski michalski adamczyk dudek zajac wieczorek jablonski novak svoboda novotny dvorak
cerny prochazka kucera vesely horak nemec pokorny marek pospisil hajek jelinek kral ruzicka
benes fiala sedlacek dolezal zeman kolar navratil cermak
nagy kovacs toth szabo horvath varga kiss molnar nemeth farkas balogh papp takacs juhasz
lakatos meszaros olah simon racz fekete
ivanov smirnov kuznetsov popov vasiliev petrov sokolov mikhailov novikov fedorov morozov
volkov alekseev lebedev semenov egorov pavlov kozlov stepanov nikolaev orlov andreev makarov
nikitin zakharov zaitsev soloviev borisov yakovlev grigoriev romanov vorobiev sergeev
kuzmin frolov alexandrov dmitriev korolev gusev kiselev ilyin maksimov polyakov sorokin
vinogradov kovalev belov medvedev antonov tarasov zhukov baranov filippov komarov davydov
belyaev gerasimov bogdanov osipov sidorov matveev titov markov
yilmaz kaya demir sahin celik yildiz yildirim ozturk aydin ozdemir arslan dogan kilic
sharma verma gupta kumar agarwal mehta shah joshi reddy nair iyer rao chopra kapoor malhotra
bhatt desai pillai menon banerjee chatterjee mukherjee das bose
sato suzuki takahashi tanaka watanabe ito yamamoto nakamura kobayashi kato yoshida yamada
sasaki yamaguchi matsumoto inoue kimura hayashi shimizu yamazaki mori abe ikeda hashimoto
ishikawa ogawa okada hasegawa fujita murakami kondo
zhang wang zhou huang zhao xu sun zhu gao lin guo luo zheng liang xie tang han feng deng cao
park choi jung kang cho yoon jang lim shin
"""

# Given names that are also everyday words, months or places: a name only before another
# capitalised word (a surname) or after a title, never alone.
_AMBIGUOUS_FIRST = frozenset(
    _words(
        """
        will may june april august mark bill grant rose joy hope faith grace art guy jack sun
        don max bob dawn summer autumn ray page chase miles frank young long lane victoria
        sydney florence georgia paris jordan austin dakota chester norman virginia carolina
        madison logan hunter carter mason tyler taylor morgan cameron christian dean earl gene
        jean penny ruby amber crystal holly ivy iris lily daisy jasmine violet pearl misty sky
        river bay rich drew reed rod pat sue kim lee li jan sam dana tracy kelly terry jessie
        jamie willie marion leslie ben dale glen glenn gill wade nelson roland curtis lance
        price bishop clay cliff brook brooke chance sterling king knight prince duke lucky angel
        """
    )
)

# Capitalised words that make a run a street, company, institution or date, not a person.
_NOT_NAME_TOKENS = frozenset(
    _words(
        """
        street avenue ave road rd lane ln drive boulevard blvd way park square place court
        terrace close crescent grove gardens mews row walk hill hills heights creek cliffs
        islands island flat flats mall bypass lodge estate station airport port harbour harbor
        university college school academy hospital clinic church cathedral bank inc ltd llc plc
        gmbh ag sa corp corporation company co group holdings partners sons brothers associates
        foundation institute hotel center centre museum theatre theater orchestra band hall
        bridge river lake mountain mount valley county city town village state republic kingdom
        united north south east west new san santa los las monday tuesday wednesday thursday
        friday saturday sunday january february march july september october november december
        ministry department office agency council committee association society club team league
        union services systems solutions technologies investments capital international global
        national federal rua rue avenida avda calle via viale piazza plaza praca strada ulica
        travessa largo box unit apt suite usns usnv uss uscgc fpo apo dpo psc
        """
    )
)
_ADDRESS_UNITS = frozenset(_words("apt suite unit box"))
_TITLES = frozenset(_words("mr mrs ms mx dr prof miss sir madam madame mme mlle herr frau sr sra dra"))
_PARTICLES = "van|von|de|der|den|ten|ter|da|di|del|della|la|le|du|dos|das|al|bin|ibn|y"
# Capitalised function words: never a name, and a run of capitalised words is split at them.
_STOP_CAPS = frozenset(
    _words(
        """
        the this that these those there here what which who whom whose when where why how my
        your his her its our their i it we you he she they a an in on at for from to of by with
        if is are was were be been can could would should do does did please and but or so not
        no yes hi hello hey dear thank thanks as all any some just also after before since while
        because then now today have has had let maybe sometimes unlike every each most more one
        two three everyone someone nobody anyone ok okay sorry note re fwd subject i'm i'll i've
        i'd i’m author authors der die das ein eine el los las les un une il lo gli
        """
    )
)
_UPPER = "A-Z" + "".join(
    re.escape(c) for c in map(chr, range(0xC0, 0x530)) if c.isupper() and unicodedata.category(c) == "Lu"
)
_LETTER = r"[^\W\d_]"
# The rest of a capitalised word after its first letter ("O'Brien", "Jean-Luc"; a possessive "'s"
# is left out).
_WORD_REST = rf"{_LETTER}*(?:['’](?!s(?!{_LETTER})){_LETTER}+|-{_LETTER}+)*"
# A capitalised word or an initial ("J.").
_TOKEN = rf"(?:[{_UPPER}]\.(?=[ \t])|[{_UPPER}]{_WORD_REST})"
# A run of capitalised words joined by 1–3 spaces or name particles ("Willemine ten Pas"). The
# pattern opens with the bare character class so `re` can skip ahead to the next capital in C; the
# lookbehind inside rejects capitals glued to a word ("iPhone"); only a title keeps its ".".
_NAME_RUN = re.compile(
    rf"[{_UPPER}](?<![\w'’-].){_WORD_REST}"
    r"(?:(?<=\b(?:Mr|Ms|Mx|Dr|Sr))\.|(?<=\b(?:Mrs|Sra|Dra|Mme))\.|(?<=\bProf)\.|(?<=\b[A-Z])\.(?=[ \t]))?"
    rf"(?:(?:[ \t]{{1,3}}|[ \t]+(?:{_PARTICLES})(?:[ \t]+(?:{_PARTICLES}))?[ \t]+){_TOKEN})*"
)

# Strong cues right before a run ("Dear …", "my name is …", "… said"): the run is a name even
# without a gazetteer hit. Checked on the one or two words before the run, without a regex.
_CUE_WORDS = frozenset(_words("dear hi hello hey thanks named called said says signed regards sincerely user"))
_CUE_PAIRS = frozenset(
    [
        "name is", "name's", "call me", "calls me", "named him", "named her", "i am", "i'm", "i’m",
        "directed by", "written by", "this is", "thank you",
    ]
)  # fmt: skip


def _cue_before(text: str, start: int) -> bool:
    seg = text[start - 24 if start > 24 else 0 : start]
    if not seg or seg[-1] not in " \t\n":
        return False
    words = seg.split()
    if not words:
        return False
    last = words[-1].lower()
    if last in _CUE_WORDS:
        return True
    if last[-1] in ",.:?":
        if last in ("name:", "name?"):
            return True
        last = last[:-1]
        if last in _CUE_WORDS:
            return True
    return len(words) > 1 and f"{words[-2].lower()} {last}" in _CUE_PAIRS


# Verbs right after a run that mark it as a person.
_VERB_AFTER = re.compile(
    r"[ \t]+(?:lives|lived|said|says|told|asked|shouted|spent|explained|wrote|married|died|replied|"
    r"smiled|laughed|whispered|listed (?:his|her)|had given|will be talking)\b"
)
# Before a run: a house number or a street abbreviation → an address, not a person.
_PLACE_BEFORE = re.compile(r"(?i)(?:\d[ \t]+|\b(?:ul|al|str|av|pl|os)\.[ \t]*)$")
# After a run: a short number ("Peter Zuidhove 188") → a street.
_NUMBER_AFTER = re.compile(r"[ \t]+\d{1,4}\b(?![ .-]?\d)")
# Surname endings that mark the last word of a two-to-four-word run as a surname; the distinctive
# ones mark even a lone word. (`str.endswith` with a tuple: far cheaper than a `…$` regex search.)
_SURNAME_SUFFIXES = tuple(
    _words(
        """
        sson sen dottir ova ski ska sky wicz enko shvili dze poulos akis escu ov ev eva vic ez elli
        ini oglu yan strom stein mann nen
        """
    )
)
_DISTINCT_SURNAME_SUFFIXES = tuple(_words("sson dottir ova wicz enko shvili poulos escu oglu"))
# "Efimiya, Mary, Ariana and Jodi": a name spreads to the undecided runs of its list.
_LIST_GAP = re.compile(r",[ \t]*(?:and[ \t]+|&[ \t]*)?|[ \t]+(?:and|&|or)[ \t]+")
# Lowercase names are caught only right after an explicit "name is" / "name:".
_NAME_IS = re.compile(
    r"[Nn][Aa][Mm][Ee](?<=\b....)(?:[ \t]+[Ii][Ss]|'s|[ \t]*:)[ \t]+([^\W\d_]+)(?:[ \t]+([^\W\d_]+))?"
)
_STOP_AFTER_NAME = frozenset(_words("is and or but the a an not on in at to of for my your this that"))
_FOLD_EXTRA = str.maketrans({"ø": "o", "ł": "l", "ß": "ss", "æ": "ae", "œ": "oe", "ð": "d", "þ": "th", "đ": "d"})


def _fold(word: str) -> str:
    """Lowercase without diacritics ("Jónás" → "jonas"; ø, ł, ß … by hand since NFKD keeps them)."""
    w = word.lower()
    return w if w.isascii() else _fold_unicode(w)


@lru_cache(maxsize=1 << 16)
def _fold_unicode(w: str) -> str:
    w = w.translate(_FOLD_EXTRA)
    return "".join(c for c in unicodedata.normalize("NFKD", w) if not unicodedata.combining(c))


_FIRST = frozenset(_fold(w) for w in _FIRST_NAMES.split())
# Names common as both (James, Thomas …) count as given names.
_LAST = frozenset(_fold(w) for w in _SURNAMES.split()) - _FIRST


# ---------------------------------------------------------------------------------------------
# The scrubber
# ---------------------------------------------------------------------------------------------


class PiiScrubber:
    """Find PII in text and replace each item with `<TYPE>`; pure, thread-safe, no I/O.

    `types` limits what is looked for (default: all of `PII_TYPES`); `phone_regions` are the
    numbering plans tried for numbers written without a country code.
    """

    def __init__(
        self,
        types: Collection[str] = PII_TYPES,
        phone_regions: Sequence[str] = DEFAULT_PHONE_REGIONS,
    ) -> None:
        unknown = set(types) - set(PII_TYPES)
        if unknown:
            raise ValueError(f"unknown PII types {sorted(unknown)}; known: {list(PII_TYPES)}")
        self.types = frozenset(types)
        self._structured = self.types - {PERSON}
        self._plan = _region_plan(tuple(phone_regions))
        self._bare_plan = tuple(p for p in self._plan if p[0] in _BARE_PHONE_REGIONS)

    # -- detection ---------------------------------------------------------------------------

    def find(self, text: str) -> list[PiiSpan]:
        """All PII spans in `text`: non-overlapping, sorted by start."""
        return self._find(text, self.types)

    def find_residual(self, text: str) -> list[str]:
        """The structured PII types still present in `text`, sorted; [] when clean.

        Leaves out names: a capitalised word left in scrubbed text is not a pattern a data-quality
        gate can assert on.
        """
        return sorted({s.type for s in self._find(text, self._structured)})

    def _find(self, text: str, types: frozenset[str]) -> list[PiiSpan]:
        cands: list[tuple[int, int, str]] = []
        if "@" in text:
            if URL_CREDENTIALS in types and "://" in text:
                for m in _URL_CREDENTIALS_RE.finditer(text):
                    cands.append((m.start(1), m.end(1), URL_CREDENTIALS))
            if EMAIL in types:
                at = text.find("@")
                while at >= 0:
                    local = _EMAIL_LOCAL_TAIL.search(text, max(0, at - 64), at)
                    m = _EMAIL_RE.match(text, local.start()) if local else None
                    if m is not None and m.end() > at:
                        cands.append((m.start(), m.end(), EMAIL))
                    at = text.find("@", at + 1)
        if _HAS_DIGIT.search(text) is not None:
            if IBAN in types:
                self._ibans(text, cands)
            if CREDIT_CARD in types:
                for m in _CARD_RE.finditer(text):
                    s, e = m.span()
                    if (
                        card_ok(_NON_DIGIT.sub("", m.group()))
                        and not _NUMBER_ROW.match(text, e)
                        and not _NUMBER_ROW_BEFORE.search(text, max(0, s - 8), s)
                        and not _ID_CONTEXT.search(text, max(0, s - 24), s)
                    ):
                        cands.append((s, e, CREDIT_CARD))
            if US_SSN in types:
                for m in _SSN_RE.finditer(text):
                    if ssn_ok(m.group(1), m.group(3), m.group(4)) and (
                        m.group(2) == "-" or _SSN_CONTEXT.search(text, max(0, m.start() - 40), m.start())
                    ):
                        cands.append((m.start(), m.end(), US_SSN))
            if IP_ADDRESS in types and "." in text:
                for m in _IPV4_RE.finditer(text):
                    if ip_ok(m.group()):
                        cands.append((m.start(), m.end(), IP_ADDRESS))
            if PHONE in types:
                self._phones(text, cands)
        if IP_ADDRESS in types and ":" in text and _IPV6_HINT.search(text):
            for m in _IPV6_RE.finditer(text):
                s = m.group()
                if len(_HEX_GROUP.findall(s)) >= 2 and ip_ok(s):  # not "::a" in Fortran or C++
                    cands.append((m.start(), m.end(), IP_ADDRESS))
        if PERSON in types:
            self._persons(text, cands)
        return _resolve(cands)

    def _ibans(self, text: str, out: list[tuple[int, int, str]]) -> None:
        for m in _IBAN_RE.finditer(text):
            start = m.start() - 2
            s = text[start : m.end()]
            want = _IBAN_LENGTHS.get(s[:2].upper())
            if want is None:
                continue
            # The regex may run on into the next word: cut at the country's registered length.
            n = 0
            for i, ch in enumerate(s):
                if ch != " ":
                    n += 1
                    if n == want:
                        break
            else:
                continue
            end = i + 1
            if end < len(s) and s[end] != " ":
                continue  # glued to more alphanumerics: not an IBAN of that length
            if iban_ok(s[:end].replace(" ", "")):
                out.append((start, start + end, IBAN))

    def _phones(self, text: str, out: list[tuple[int, int, str]]) -> None:
        taken = [(s, e) for s, e, _ in out]
        for m in _PHONE_RE.finditer(text):
            start, end = m.span()
            cand = m.group()
            ext = _EXTENSION.search(cand) if "x" in cand else None
            core = cand[: ext.start()] if ext else cand
            digits = _NON_DIGIT.sub("", core)
            if not 7 <= len(digits) <= 15:
                continue
            plus = False
            if start and text[start - 1] == "(":
                start -= 1
                core = "(" + core
                if start and text[start - 1] == "+":  # "+(44) …"
                    start -= 1
                    plus = True
            elif start and text[start - 1] == "+":
                start -= 1
                plus = True
            elif start > 1 and text[start - 2 : start] == "+ ":
                start -= 2
                plus = True
            if plus and start and (text[start - 1].isalnum() or text[start - 1] in "+/.-"):
                continue
            if core[0] == "(" and ")" not in core:
                start += 1  # "(555 123 4567": the bracket is prose, not part of the number
                core = core[1:]
            if any(s < end and start < e for s, e in taken):
                continue  # already a card, SSN, IBAN or IP: don't pay for phone validation
            # Shapes that are page ranges, decimals, coordinates, dates or citations, never phones.
            if ". " in core or "- " in core or " -" in core or " ." in core or _DATE_IN.search(core):
                continue
            bare_core = _PAREN_GROUP.sub(" ", core) if "(" in core else core
            if "(" in bare_core or ")" in bare_core:
                continue  # brackets around anything but an area code
            groups = _GROUP_SPLIT.split(core.strip(" ()"))
            if _NUMBER_ROW.match(text, end) or _NUMBER_ROW_BEFORE.search(text, max(0, start - 8), start):
                continue  # part of a longer row of numbers than any phone
            if _ID_CONTEXT.search(text, max(0, start - 16), start):
                continue
            if not plus and (
                all(len(g) == 4 and _YEAR.fullmatch(g) for g in groups) or any(len(g) == 1 for g in groups[1:])
            ):
                continue  # "2017 2018 2019", "10 10 5 25": years and table cells
            cue = self._phone_cue(text, start, end)
            if plus:
                valid, possible = _phone_international("+" + cand)
            elif digits.startswith("00") and len(digits) > 9:
                valid, possible = _phone_international("+" + digits[2:])
            else:
                seps = set(_PHONE_SEP.findall(bare_core.strip()))
                # Unformatted runs, two-group numbers ("3610-114"), mixed separators and thousands
                # groupings ("1 600 000") are ids, postcodes and amounts more often than phones:
                # those need a phone cue nearby.
                weak = (
                    len(groups) <= 2
                    or len(seps) > 1
                    or (len(groups[0]) == 1 and all(len(g) == 3 for g in groups[1:]))
                    # "58 59 57 174": short space-separated groups are table rows as often as phones
                    or (seps == {" "} and groups[0][0] != "0" and all(len(g) <= 3 for g in groups))
                )
                if weak and not cue:
                    continue
                valid, possible = _phone_national(digits, self._plan if seps else self._bare_plan, cue)
            if valid or (possible and (plus or cue)):
                out.append((start, end, PHONE))

    @staticmethod
    def _phone_cue(text: str, start: int, end: int) -> bool:
        return bool(
            _PHONE_CONTEXT.search(text, max(0, start - 40), start) or _PHONE_CONTEXT.match(text, end + 1, end + 12)
        )

    def _persons(self, text: str, out: list[tuple[int, int, str]]) -> None:
        # Runs that are names (True) or might be (None); the rest are dropped. This loop meets every
        # capitalised word of a document, so the one-word case is inlined.
        runs: list[tuple[int, int, bool | None]] = []
        first, last, ambiguous, stop, titles = _FIRST, _LAST, _AMBIGUOUS_FIRST, _STOP_CAPS, _TITLES
        for m in _NAME_RUN.finditer(text):
            s, e = m.span()
            name = text[s:e]
            if " " not in name and "\t" not in name:
                k = name.lower()
                if not k.isascii():
                    k = _fold_unicode(k)
                if k in stop or k in titles or len(k) < 2 or k in _NOT_NAME_TOKENS:
                    continue
                if name[1:].isupper():
                    continue  # an acronym ("BSA", "MARC") or a shouted word, not a name on its own
                named = (
                    (k in first and k not in ambiguous)
                    or k in last
                    or k.endswith(_DISTINCT_SURNAME_SUFFIXES)
                    or _cue_before(text, s)
                    or (text[e : e + 1] == " " and _VERB_AFTER.match(text, e))
                )
                if not named:
                    runs.append((s, e, None))
                elif not self._place(text, s, e):
                    runs.append((s, e, True))
                continue
            # Split the run at function words and titles; a title marks what follows.
            toks: list[tuple[int, int, str]] = []
            titled = False
            pos = s
            for word in name.split():
                ws = text.find(word, pos)
                pos = ws + len(word)
                if not word[0].isupper():
                    continue  # a name particle ("ten", "van der"): inside the span, not a token
                k = _fold(word.rstrip("."))
                if k in stop or k in titles:
                    if toks:
                        self._decide(text, toks, titled, runs)
                        toks = []
                    titled = k in titles
                else:
                    toks.append((ws, pos, k))
            if toks:
                self._decide(text, toks, titled, runs)
        # A name spreads to the undecided runs of its list ("Efimiya, Mary, Ariana and Jodi").
        if len(runs) > 1 and any(st is None for _, _, st in runs) and any(st for _, _, st in runs):
            for order in (range(1, len(runs)), range(len(runs) - 2, -1, -1)):
                step = 1 if order.step == 1 else -1
                for i in order:
                    j = i - step
                    if runs[i][2] is None and runs[j][2]:
                        a, b = (runs[j], runs[i]) if j < i else (runs[i], runs[j])
                        if _LIST_GAP.fullmatch(text, a[1], b[0]) and not self._place(text, runs[i][0], runs[i][1]):
                            runs[i] = (runs[i][0], runs[i][1], True)
        for s, e, st in runs:
            if st:
                out.append((s, e, PERSON))
        if "ame" in text:
            for m in _NAME_IS.finditer(text):
                w1, w2 = m.group(1), m.group(2)
                if w1[0].isupper() or _fold(w1) not in first:
                    continue  # capitalised ones are the run layer's
                end = m.end(1)
                if w2 and w2.lower() not in _STOP_AFTER_NAME and not w2[0].isupper():
                    end = m.end(2)
                out.append((m.start(1), end, PERSON))

    def _decide(
        self, text: str, toks: list[tuple[int, int, str]], titled: bool, runs: list[tuple[int, int, bool | None]]
    ) -> None:
        if len(toks) == 1:
            s, e, k = toks[0]
            span = self._person_word(text, s, e, k, titled)
        else:
            span = self._person_run(text, toks, titled)
        if span is None:
            runs.append((toks[0][0], toks[-1][1], None))
        elif span is not False:
            runs.append((span[0], span[1], True))

    @staticmethod
    def _place(text: str, start: int, end: int) -> bool:
        return bool(_PLACE_BEFORE.search(text, max(0, start - 8), start) or _NUMBER_AFTER.match(text, end))

    def _person_word(self, text: str, s: int, e: int, k: str, titled: bool) -> tuple[int, int] | bool | None:
        """One capitalised word (folded `k`): its span if a name, False if surely not, None if unknown."""
        if len(k) < 2 or k in _NOT_NAME_TOKENS:
            return False
        if titled:
            return (s, e)
        if (k in _FIRST and k not in _AMBIGUOUS_FIRST) or k in _LAST or k.endswith(_DISTINCT_SURNAME_SUFFIXES):
            return False if self._place(text, s, e) else (s, e)
        if text[s + 1 : e].isupper():
            return False  # an acronym ("BSA", "MARC")
        if _cue_before(text, s) or (text[e : e + 1] == " " and _VERB_AFTER.match(text, e)):
            return False if self._place(text, s, e) else (s, e)
        return None

    def _person_run(self, text: str, toks: list[tuple[int, int, str]], titled: bool) -> tuple[int, int] | bool | None:
        """Capitalised words (folded): the span of the name in them, False if surely none, None if unknown."""
        for i, (_, _, k) in enumerate(toks):
            if k in _NOT_NAME_TOKENS:
                if k in _ADDRESS_UNITS and i > 0:  # "Mrs. Barbara Yudina Apt. 675": the name ends there
                    del toks[i:]
                    break
                return False  # streets, companies and institutions named after people
        s, e = toks[0][0], toks[-1][1]
        if not titled and self._place(text, s, e):
            return False
        n = len(toks)
        for i, (ts, _, k) in enumerate(toks):
            if k in _FIRST and (k not in _AMBIGUOUS_FIRST or i + 1 < n or titled):
                return ts, toks[min(n, i + 4) - 1][1]
        if text[s + 1 : e].replace(" ", "").replace(".", "").isupper():
            return False  # a heading or an acronym run ("WHO IS WHO")
        if n <= 4 and (titled or _cue_before(text, s) or _VERB_AFTER.match(text, e)):
            return s, e
        for i, (ts, _, k) in enumerate(toks):
            if k in _LAST:
                return ts, toks[min(n, i + 2) - 1][1]
        if n <= 4 and toks[-1][2].endswith(_SURNAME_SUFFIXES):
            return s, e
        return None

    # -- replacement -------------------------------------------------------------------------

    def scrub(self, text: str) -> ScrubResult:
        """Replace every detected item with `<TYPE>`; spans point into the original `text`."""
        spans = self.find(text)
        if not spans:
            return ScrubResult(text, ())
        parts: list[str] = []
        pos = 0
        for t, s, e in spans:
            parts.append(text[pos:s])
            parts.append(f"<{t}>")
            pos = e
        parts.append(text[pos:])
        return ScrubResult("".join(parts), tuple(spans))

    def scrub_table(self, table: pa.Table, column: str = "text") -> tuple[pa.Table, Counter[str]]:
        """Scrub `column` of a documents table and set `pii_spans` (list<struct<type, start, end>>).

        Null texts stay null with an empty span list. Returns the new table and per-type counts.
        """
        if column not in table.column_names:
            raise KeyError(f"table has no column {column!r} to scrub (columns: {table.column_names})")
        counts: Counter[str] = Counter()
        out_text: list[str | None] = []
        out_spans: list[list[dict[str, object]]] = []
        for t in table.column(column).to_pylist():
            if t is None:
                out_text.append(None)
                out_spans.append([])
                continue
            r = self.scrub(t)
            out_text.append(r.text)
            out_spans.append([{"type": ty, "start": s, "end": e} for ty, s, e in r.spans])
            counts.update(ty for ty, _, _ in r.spans)
        field = table.schema.field(column)
        table = table.set_column(table.column_names.index(column), field, pa.array(out_text, type=field.type))
        spans = pa.array(out_spans, type=SPANS_TYPE)
        if "pii_spans" in table.column_names:
            return table.set_column(table.column_names.index("pii_spans"), "pii_spans", spans), counts
        return table.append_column("pii_spans", spans), counts


def _resolve(cands: list[tuple[int, int, str]]) -> list[PiiSpan]:
    """Non-overlapping spans: the higher-priority type first, then the longer span."""
    if len(cands) <= 1:
        return [PiiSpan(t, s, e) for s, e, t in cands]
    cands.sort(key=lambda c: (_PRIORITY[c[2]], c[0] - c[1], c[0]))
    starts: list[int] = []  # kept spans, sorted by start; they never overlap each other
    kept: list[tuple[int, int, str]] = []
    for s, e, t in cands:
        i = bisect_right(starts, s)
        if (i and kept[i - 1][1] > s) or (i < len(starts) and starts[i] < e):
            continue
        starts.insert(i, s)
        kept.insert(i, (s, e, t))
    return [PiiSpan(t, s, e) for s, e, t in kept]


_DEFAULT: PiiScrubber | None = None


def default_scrubber() -> PiiScrubber:
    """The process-wide scrubber: all types, the default phone regions."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = PiiScrubber()
    return _DEFAULT


def scrub(text: str) -> ScrubResult:
    """`PiiScrubber().scrub(text)` with the default configuration."""
    return default_scrubber().scrub(text)


def scrub_table(table: pa.Table, column: str = "text") -> tuple[pa.Table, Counter[str]]:
    """`PiiScrubber().scrub_table(table, column)` with the default configuration."""
    return default_scrubber().scrub_table(table, column)


def find_residual_pii(text: str) -> list[str]:
    """Structured PII types still matching in `text`; [] for properly scrubbed output."""
    return default_scrubber().find_residual(text)


def score_spans(
    gold: Iterable[tuple[str, int, int]], predicted: Iterable[tuple[str, int, int]]
) -> dict[str, tuple[int, int, int, int]]:
    """Per type: (gold spans found, gold spans, predictions correct, predictions).

    A gold span is found when a predicted span of the same type overlaps it; a prediction is
    correct when it overlaps a gold span of its type (the rule stated in docs/pii.md).
    """
    by_gold: dict[str, list[tuple[int, int]]] = {}
    by_pred: dict[str, list[tuple[int, int]]] = {}
    for t, s, e in gold:
        by_gold.setdefault(t, []).append((s, e))
    for t, s, e in predicted:
        by_pred.setdefault(t, []).append((s, e))
    out: dict[str, tuple[int, int, int, int]] = {}
    for t in by_gold.keys() | by_pred.keys():
        g, p = by_gold.get(t, []), by_pred.get(t, [])
        found = sum(any(ps < ge and gs < pe for ps, pe in p) for gs, ge in g)
        correct = sum(any(gs < pe and ps < ge for gs, ge in g) for ps, pe in p)
        out[t] = (found, len(g), correct, len(p))
    return out
