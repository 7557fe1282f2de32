/// `count` and the noun, singular for 1: "1 page", "2 pages", "0 pages". The plural is `noun`
/// plus "s" unless given.
func counted(_ count: some BinaryInteger, _ noun: String, plural: String? = nil) -> String {
    "\(count) \(count == 1 ? noun : plural ?? noun + "s")"
}
