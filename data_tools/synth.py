"""Generate deterministic synthetic Japanese news with offender labels.

Positives name offenders (容疑者/被告) among victims and witnesses (さん) who
must not be extracted; negatives name people who are not offenders. Names are
surname x given-name combinations; a fixed share of combinations is reserved
for validation, so held-out articles name people never seen in training.

Every article is generated from its own ``random.Random`` seeded by
(seed, split, index), so any file is reproducible record by record.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import Callable

from core.prompt import answer_json, default_instruction
from core.records import refuse_overwrite, write_rows
from data_tools import cli_args

SURNAMES = (
    "佐藤 鈴木 高橋 田中 伊藤 渡辺 山本 中村 小林 加藤 吉田 山田 佐々木 山口 松本 井上 木村 林 清水 "
    "山崎 森 阿部 池田 橋本 山下 石川 中島 前田 藤田 後藤 小川 岡田 村上 長谷川 近藤 石井 斎藤 坂本 "
    "遠藤 藤井 青木 福田 三浦 西村 藤原 太田 松田 原田 岡本 中野 中川 小野 田村 竹内 金子 和田 中山 "
    "石田 上田 森田 小島 柴田 原 宮崎 酒井 工藤 横山 宮本 内田 高木 安藤 島田 谷口 大野 高田 丸山 "
    "今井 河野 藤本 村田 武田 上野 杉山 増田 小山 大塚 平野 菅原 久保 松井 千葉 岩崎 桜井 木下 野口 "
    "松尾 菊地 野村 新井 渡部 浅野 熊谷 荒木 大西 飯田 北村 永井 川口 関 堀 矢野 秋山 水野 星野"
).split()
_MALE_HEADS = "健 大 翔 拓 和 浩 正 誠 直 達 雄 俊 康 智 英 秀 光 優 亮 信 隆 洋 修 博".split()
_MALE_TAILS = "一 太 介 輔 也 樹 人 司 彦 郎 平 斗 志".split()
_FEMALE_HEADS = "美 由 真 恵 愛 彩 奈 菜 裕 千 友 紀 早 明 陽 結".split()
_FEMALE_TAILS = "子 香 美 奈 恵 穂 花 代 里 希 乃 佳".split()
GIVEN_NAMES = tuple(
    [(h + t, "m") for h in _MALE_HEADS for t in _MALE_TAILS]
    + [(h + t, "f") for h in _FEMALE_HEADS for t in _FEMALE_TAILS if h != t]
)

# (prefecture police, address prefix, station)
AREAS = (
    ("警視庁", "東京都新宿区", "新宿"), ("警視庁", "東京都足立区", "西新井"), ("警視庁", "東京都世田谷区", "成城"),
    ("警視庁", "東京都八王子市", "八王子"), ("大阪府警", "大阪市北区", "曽根崎"), ("大阪府警", "堺市堺区", "堺"),
    ("大阪府警", "大阪府東大阪市", "布施"), ("神奈川県警", "横浜市中区", "加賀町"), ("神奈川県警", "川崎市川崎区", "川崎"),
    ("神奈川県警", "神奈川県藤沢市", "藤沢"), ("北海道警", "札幌市中央区", "札幌中央"), ("北海道警", "北海道旭川市", "旭川中央"),
    ("福岡県警", "福岡市博多区", "博多"), ("福岡県警", "北九州市小倉北区", "小倉北"), ("愛知県警", "名古屋市中村区", "中村"),
    ("愛知県警", "愛知県豊田市", "豊田"), ("京都府警", "京都市左京区", "下鴨"), ("兵庫県警", "神戸市中央区", "生田"),
    ("兵庫県警", "兵庫県姫路市", "姫路"), ("埼玉県警", "さいたま市浦和区", "浦和"), ("埼玉県警", "埼玉県川越市", "川越"),
    ("千葉県警", "千葉市中央区", "千葉中央"), ("千葉県警", "千葉県船橋市", "船橋"), ("広島県警", "広島市中区", "広島中央"),
    ("宮城県警", "仙台市青葉区", "仙台中央"), ("静岡県警", "静岡県浜松市", "浜松中央"), ("新潟県警", "新潟市中央区", "新潟中央"),
    ("岡山県警", "岡山市北区", "岡山中央"), ("熊本県警", "熊本市中央区", "熊本中央"), ("長野県警", "長野県松本市", "松本"),
    ("茨城県警", "茨城県水戸市", "水戸"), ("栃木県警", "栃木県宇都宮市", "宇都宮中央"), ("群馬県警", "群馬県前橋市", "前橋"),
    ("奈良県警", "奈良県奈良市", "奈良"), ("沖縄県警", "沖縄県那覇市", "那覇"), ("鹿児島県警", "鹿児島県鹿児島市", "鹿児島中央"),
    ("石川県警", "石川県金沢市", "金沢中"), ("岐阜県警", "岐阜県岐阜市", "岐阜中"), ("三重県警", "三重県津市", "津"),
    ("愛媛県警", "愛媛県松山市", "松山東"),
)
OCCUPATIONS = (
    "会社員", "無職", "アルバイト", "自営業", "会社役員", "パート従業員", "大学生", "公務員", "建設作業員",
    "飲食店店長", "派遣社員", "トラック運転手", "介護職員", "不動産業", "団体職員", "自称会社員", "高校教諭",
    "医師", "理容師", "タクシー運転手", "看護師", "塗装工", "僧侶", "美容師", "中学校教諭", "自称投資家",
)
# (charge, what was done, where)
CRIMES = (
    ("窃盗", "商品を盗んだ", "市内のドラッグストア"), ("詐欺", "高齢女性から現金をだまし取った", "市内の住宅"),
    ("傷害", "男性を殴り、けがをさせた", "駅前の路上"), ("住居侵入", "他人の住宅に侵入した", "市内の住宅"),
    ("強盗致傷", "店員を刃物で脅して現金を奪い、けがをさせた", "市内のコンビニエンスストア"),
    ("覚醒剤取締法違反（所持）", "覚醒剤を所持していた", "自宅"),
    ("道路交通法違反（酒気帯び運転）", "酒を飲んで乗用車を運転した", "市内の国道"),
    ("殺人未遂", "知人の男性を包丁で刺した", "市内のアパート"),
    ("威力業務妨害", "爆破を予告する電話をかけ、業務を妨害した", "市内の飲食店"),
    ("業務上横領", "勤務先の売上金を着服した", "勤務先の事務所"), ("器物損壊", "駐車中の車を傷つけた", "市内の駐車場"),
    ("不同意わいせつ", "女性の体を触った", "走行中の電車内"), ("放火", "空き家に火をつけた", "市内の住宅街"),
    ("暴行", "駅員の胸を突き飛ばした", "駅の改札"), ("恐喝", "少年から現金を脅し取った", "市内の公園"),
    ("過失運転致傷", "自転車の女性をはね、けがをさせた", "市内の交差点"),
    ("特殊詐欺（受け子）", "高齢男性からキャッシュカードを受け取った", "市内の住宅"),
)
AWARDS = ("県文化賞", "市民栄誉賞", "地域貢献賞", "技能功労者表彰", "消防庁長官表彰", "文化功労者")
SPORTS = (("サッカー", "決勝ゴールを決めた"), ("野球", "完封勝利を挙げた"), ("陸上", "大会新記録で優勝した"),
          ("柔道", "初優勝を果たした"), ("卓球", "準決勝に進んだ"), ("水泳", "日本新記録を樹立した"))
TEAMS = ("北斗FC", "湾岸ユナイテッド", "東央大", "西海ブレイズ", "南星工業", "青嶺クラブ")
ROLES = ("元市長", "作家", "元県議", "画家", "元教授", "俳人", "実業家")
QUOTES = ("間違いない", "覚えていない", "お金に困っていた", "やっていない", "ストレスがたまっていた")

HELD_OUT_NAME_PERCENT = 20


def _name_is_held_out(surname: str, given: str) -> bool:
    return zlib.crc32(f"{surname}{given}".encode()) % 100 < HELD_OUT_NAME_PERCENT


@dataclass
class Person:
    surname: str
    given: str
    age: int
    occupation: str | None
    address: str | None

    @property
    def name(self) -> str:
        return self.surname + self.given

    def label(self, charge: str | None) -> dict:
        return {"name": self.name, "age": self.age, "occupation": self.occupation,
                "address": self.address, "charge": charge}


class Article:
    """Random choices for one article, drawing names from one side of the name split."""

    def __init__(self, rng: random.Random, held_out_names: bool):
        self.rng = rng
        self.held_out = held_out_names
        self.area = rng.choice(AREAS)
        self.used: set[str] = set()
        self.people: list[Person] = []

    def person(self, min_age: int = 19, max_age: int = 79, surname: str | None = None) -> Person:
        rng = self.rng
        while True:
            s = surname or rng.choice(SURNAMES)
            g, _ = rng.choice(GIVEN_NAMES)
            if _name_is_held_out(s, g) == self.held_out and s + g not in self.used:
                self.used.add(s + g)
                break
        p = Person(s, g, rng.randint(min_age, max_age), rng.choice(OCCUPATIONS), self.address())
        self.people.append(p)
        return p

    def address(self) -> str:
        return self.rng.choice(AREAS)[1] if self.rng.random() < 0.3 else self.area[1]

    def age(self, age: int) -> str:
        digits = str(age)
        if self.rng.random() < 0.15:
            digits = digits.translate(str.maketrans("0123456789", "０１２３４５６７８９"))
        return f"（{digits}）" if self.rng.random() < 0.6 else f"({digits})"

    def prefecture(self) -> str:
        police = self.area[0]
        return "東京都" if police == "警視庁" else police.removesuffix("警")

    def police(self) -> str:
        return f"{self.area[0]}{self.area[2]}署"

    def day(self) -> str:
        return f"{self.rng.randint(1, 28)}日"

    def month(self) -> str:
        return f"{self.rng.randint(1, 12)}月"

    def crime(self) -> tuple[str, str, str]:
        return self.rng.choice(CRIMES)

    def suspect(self, p: Person, title: str = "容疑者") -> str:
        """'東京都新宿区、会社員山田太郎容疑者（34）'"""
        return f"{p.address}、{p.occupation}{p.name}{title}{self.age(p.age)}"

    def san(self, p: Person) -> str:
        return f"{p.address}の{p.occupation.removeprefix('自称')}{p.name}さん{self.age(p.age)}"

    def attitude(self, surname: str) -> str:
        if self.rng.random() < 0.5:
            return f"調べに対し、{surname}容疑者は「{self.rng.choice(QUOTES)}」と容疑を認めているという。"
        return f"{surname}容疑者は「身に覚えがない」と容疑を否認している。"


# ---- positive shapes: each returns (article text, offender labels) ----

def pos_arrest(a: Article):
    p, (charge, act, place) = a.person(), a.crime()
    text = (f"{a.police()}は{a.day()}、{charge}の疑いで、{a.suspect(p)}を逮捕した。"
            f"発表によると、{p.surname}容疑者は{a.month()}ごろ、{place}で{act}疑い。{a.attitude(p.surname)}")
    return text, [p.label(charge)]


def pos_arrest_victim(a: Article):
    p, v, (charge, act, place) = a.person(), a.person(), a.crime()
    text = (f"{a.san(v)}に対する{charge}の疑いで、{a.police()}は{a.day()}、{a.suspect(p)}を逮捕した。"
            f"同署によると、{p.surname}容疑者は{place}で、{v.surname}さんに対し{act}疑いが持たれている。"
            f"{v.surname}さんは「怖かった」と話しているという。")
    return text, [p.label(charge)]


def pos_multi(a: Article):
    people = [a.person() for _ in range(a.rng.choice((2, 2, 3)))]
    charge, act, place = a.crime()
    listed = "と、".join(a.suspect(p) for p in people)
    text = (f"{a.police()}は{a.day()}、{charge}の疑いで、{listed}の{len(people)}人を逮捕した。"
            f"{people[0].surname}容疑者らは共謀して{place}で{act}疑い。"
            f"同署は{people[-1].surname}容疑者が指示役だったとみて調べている。")
    return text, [p.label(charge) for p in people]


def pos_rearrest(a: Article):
    p, (charge, act, place), (old, _, _) = a.person(), a.crime(), a.crime()
    text = (f"{a.police()}は{a.day()}、{charge}の疑いで、{a.suspect(p)}を再逮捕した。"
            f"{p.surname}容疑者は{a.month()}、{old}の疑いで逮捕されていた。"
            f"再逮捕容疑は{place}で{act}疑い。")
    return text, [p.label(charge)]


def pos_witness(a: Article):
    p, w, (charge, act, place) = a.person(), a.person(), a.crime()
    official = a.person(40, 60)
    text = (f"{place}で{act}として、{a.police()}は{a.day()}、{charge}の疑いで{a.suspect(p)}を現行犯逮捕した。"
            f"近くにいた{w.occupation}の{w.name}さん{a.age(w.age)}が110番通報した。"
            f"同署の{official.name}副署長は「再発防止に努める」と話した。")
    return text, [p.label(charge)]


def pos_court(a: Article):
    p, judge, (charge, act, place) = a.person(), a.person(40, 65), a.crime()
    years = a.rng.randint(1, 8)
    court = a.prefecture()[:-1] if a.prefecture() != "北海道" else "札幌"
    text = (f"{place}で{act}として{charge}の罪に問われた{a.suspect(p, '被告')}の判決公判が{a.day()}、"
            f"{court}地裁であった。{judge.name}裁判長は「犯行は悪質だ」として懲役{years}年"
            f"（求刑懲役{years + 2}年）を言い渡した。")
    return text, [p.label(charge)]


def pos_papers_sent(a: Article):
    p, (charge, act, place) = a.person(), a.crime()
    text = (f"{a.police()}は{a.day()}、{place}で{act}として、{charge}の疑いで{a.suspect(p)}を"
            f"書類送検した。同署によると、{p.surname}容疑者は任意の調べに容疑を認めている。")
    return text, [p.label(charge)]


def pos_unknown_details(a: Article):
    p, (charge, act, place) = a.person(), a.crime()
    p.address, p.occupation = None, None
    text = (f"{a.police()}は{a.day()}、{charge}の疑いで、住所、職業ともに不詳の{p.name}容疑者"
            f"{a.age(p.age)}を逮捕した。{p.surname}容疑者は{place}で{act}疑い。"
            f"同署は身元の確認を進めている。")
    return text, [p.label(charge)]


def pos_domestic(a: Article):
    p = a.person(25, 79)
    spouse = a.person(25, 79, surname=p.surname)
    text = (f"妻の{spouse.name}さん{a.age(spouse.age)}を殴りけがをさせたとして、{a.police()}は"
            f"{a.day()}、傷害の疑いで、夫で{p.occupation}の{p.name}容疑者{a.age(p.age)}を逮捕した。"
            f"自宅は{p.address}。{spouse.given}さんが近所の住民に助けを求め、発覚した。")
    return text, [{"name": p.name, "age": p.age, "occupation": p.occupation,
                   "address": p.address, "charge": "傷害"}]


# ---- negative shapes ----

def neg_accident(a: Article):
    v = a.person()
    h = a.rng.randint(1, 11)
    text = (f"{a.day()}午前{h}時ごろ、{a.area[1]}の国道で、乗用車とバイクが衝突し、バイクを運転していた"
            f"{a.san(v)}が病院に運ばれたが、まもなく死亡が確認された。乗用車の男性にけがはなかった。"
            f"{a.police()}が事故の原因を調べている。")
    return text, []


def neg_award(a: Article):
    p = a.person(45, 90)
    text = (f"{a.prefecture()}は{a.day()}、今年度の{a.rng.choice(AWARDS)}を{a.san(p)}に贈ると発表した。"
            f"{p.surname}さんは長年、地域の子どもたちへの指導に尽力してきた。"
            f"{p.surname}さんは「皆さんのおかげです」と喜びを語った。")
    return text, []


def neg_sports(a: Article):
    p, coach = a.person(18, 34), a.person(40, 60)
    sport, feat = a.rng.choice(SPORTS)
    text = (f"{sport}の大会が{a.day()}行われ、{a.rng.choice(TEAMS)}の{p.name}選手{a.age(p.age)}が{feat}。"
            f"{coach.name}監督は「{p.surname}はよく粘った」とたたえた。")
    return text, []


def neg_obituary(a: Article):
    p, heir = a.person(70, 99), a.person(40, 70)
    text = (f"{p.name}氏（{a.rng.choice(ROLES)}）が{a.day()}、肺炎のため{a.area[1]}の病院で死去した。"
            f"{p.age}歳。葬儀は近親者で行う。喪主は長男{heir.name}さん。")
    return text, []


def neg_interview(a: Article):
    p, q = a.person(45, 75), a.person()
    text = (f"{a.area[1]}の{p.name}市長は{a.day()}の記者会見で、新たな子育て支援策を発表した。"
            f"会見に同席した{q.occupation}の{q.name}さんは「安心して働ける」と話した。")
    return text, []


def neg_unknown_offender(a: Article):
    v = a.person(60, 90)
    text = (f"{a.day()}未明、{a.san(v)}方に男が押し入り、現金約{a.rng.randint(2, 90)}万円を奪って逃げた。"
            f"{v.surname}さんにけがはなかった。{a.police()}は強盗事件として、逃げた男の行方を追っている。")
    return text, []


def neg_fraud_victim(a: Article):
    v = a.person(65, 92)
    text = (f"{a.police()}は{a.day()}、{a.san(v)}が息子を名乗る男からの電話で現金"
            f"{a.rng.randint(50, 900)}万円をだまし取られたと発表した。同署は特殊詐欺事件として調べている。")
    return text, []


def neg_juvenile(a: Article):
    v, (charge, act, place) = a.person(), a.crime()
    grade = a.rng.choice(("高校1年", "高校2年", "高校3年", "中学3年"))
    text = (f"{a.police()}は{a.day()}、{charge}の疑いで、{a.area[1]}に住む{grade}の男子生徒"
            f"{a.age(a.rng.randint(15, 17))}を逮捕した。男子生徒は{place}で{act}疑い。"
            f"被害に遭った{a.san(v)}にけがはなかった。")
    return text, []


POSITIVE_SHAPES: dict[str, Callable] = {
    "arrest": pos_arrest, "arrest_victim": pos_arrest_victim, "multi": pos_multi,
    "rearrest": pos_rearrest, "witness": pos_witness, "court": pos_court,
    "papers_sent": pos_papers_sent, "unknown_details": pos_unknown_details, "domestic": pos_domestic,
}
NEGATIVE_SHAPES: dict[str, Callable] = {
    "accident": neg_accident, "award": neg_award, "sports": neg_sports, "obituary": neg_obituary,
    "interview": neg_interview, "unknown_offender": neg_unknown_offender,
    "fraud_victim": neg_fraud_victim, "juvenile": neg_juvenile,
}
DEFAULT_HARD_SHAPES = ("court", "juvenile")


def write_article(seed: int, split: str, kind: str, index: int, shapes: tuple[str, ...],
                  held_out_names: bool) -> tuple[str, str, list[dict], list[str]]:
    """(shape, text, offender labels, every person named in order of appearance)."""
    rng = random.Random(f"{seed}:{split}:{kind}:{index}")
    table = POSITIVE_SHAPES if kind == "positive" else NEGATIVE_SHAPES
    shape = rng.choice(shapes)
    article = Article(rng, held_out_names)
    text, offenders = table[shape](article)
    named = sorted((p.name for p in article.people), key=text.find)
    return shape, text, offenders, named


def make_record(seed: int, split: str, kind: str, index: int, shapes: tuple[str, ...],
                held_out_names: bool, instruction: str) -> dict:
    """One article; the same arguments always give the same record. `non_offenders`: the other people the
    article names (victims, witnesses, judges, relatives), for the non-offender extraction rate."""
    shape, text, offenders, named = write_article(seed, split, kind, index, shapes, held_out_names)
    offender_names = {o["name"] for o in offenders}
    return {"id": f"{split}-{kind[:3]}-{index:06d}", "instruction": instruction, "input": text,
            "output": answer_json(offenders), "shape": shape,
            "non_offenders": [n for n in named if n not in offender_names]}


def shapes_for(kind: str, exclude_shapes=(), only_shapes=()) -> tuple[str, ...]:
    table = POSITIVE_SHAPES if kind == "positive" else NEGATIVE_SHAPES
    shapes = tuple(s for s in table if s not in exclude_shapes and (not only_shapes or s in only_shapes))
    if not shapes:
        raise ValueError(f"no {kind} article shapes left to generate")
    return shapes


def generate(seed: int, split: str, kind: str, count: int, *, exclude_shapes=(), only_shapes=(),
             held_out_names: bool = False, instruction: str | None = None, start: int = 0) -> list[dict]:
    shapes = shapes_for(kind, exclude_shapes, only_shapes)
    instruction = instruction or default_instruction()
    return [make_record(seed, split, kind, i, shapes, held_out_names, instruction)
            for i in range(start, start + count)]


def add_arguments(p) -> None:
    p.add_argument("--out-dir", default="data/train", help="folder for the files (default: data/train)")
    p.add_argument("--positives", type=int, default=26_221, help="training positives (default: 26,221)")
    p.add_argument("--negatives", type=int, default=96_000,
                   help="negatives with training names (default: 96,000)")
    p.add_argument("--heldout-negatives", type=int, default=4_000,
                   help="negatives with held-out names appended after --negatives; `prepare` "
                        "puts them in the validation set (default: 4,000)")
    p.add_argument("--val-positives", type=int, default=1_000, help="validation positives (default: 1,000)")
    p.add_argument("--hard", type=int, default=0,
                   help="write N hard validation articles (half positive) whose shapes "
                        f"({', '.join(DEFAULT_HARD_SHAPES)}) are left out of every other file")
    p.add_argument("--seed", type=int, default=0)
    cli_args.add_force(p)


def run(args) -> int:
    from pathlib import Path

    out = Path(args.out_dir)
    paths = {name: out / Path(default).name for name, default in (
        ("train", cli_args.TRAIN_POSITIVES), ("val", cli_args.VAL_POSITIVES),
        ("neg", cli_args.NEGATIVES), ("hard", cli_args.VAL_HARD))}
    if not args.hard:
        del paths["hard"]
    refuse_overwrite(paths.values(), args.force)
    exclude = DEFAULT_HARD_SHAPES if args.hard else ()
    files = {
        "train": generate(args.seed, "train", "positive", args.positives, exclude_shapes=exclude),
        "val": generate(args.seed, "val", "positive", args.val_positives, exclude_shapes=exclude,
                        held_out_names=True),
        "neg": generate(args.seed, "train", "negative", args.negatives, exclude_shapes=exclude)
        + generate(args.seed, "val", "negative", args.heldout_negatives, exclude_shapes=exclude,
                   held_out_names=True),
    }
    if args.hard:
        half = args.hard // 2
        files["hard"] = (
            generate(args.seed, "hard", "positive", args.hard - half, only_shapes=DEFAULT_HARD_SHAPES,
                     held_out_names=True)
            + generate(args.seed, "hard", "negative", half, only_shapes=DEFAULT_HARD_SHAPES,
                       held_out_names=True))
    for key, records in files.items():
        write_rows(paths[key], records)
        print(f"wrote {len(records):>7,} records to {paths[key]}")
    return 0
